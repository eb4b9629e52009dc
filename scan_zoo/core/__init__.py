"""Pure functions of tensors, one per paper equation: the losses and masks, neighbour mining, DSC's dense terms, metrics."""
