"""torch.hub entry points for the scan_zoo weights, derived from the zoo registry.

    torch.hub.load("path/to/scan_zoo", "create_model", "test_resnet.scan_digits", source="local")
    torch.hub.load("path/to/scan_zoo", "test_resnet_scan_digits", source="local")

One function per zoo entry that has weights (its headline metric in the docstring), and a generic
``create_model(name, **kwargs)``. Works from a checkout whether or not scan_zoo is installed: torch.hub
puts this folder on ``sys.path`` before importing this file.
"""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub", "yaml"]


def create_model(name: str, pretrained: bool = True, **kwargs):
    """A zoo model by its name ``<arch>.<tag>`` (``scan_zoo.list_models()``); kwargs go to timm.create_model."""
    import timm

    import scan_zoo  # noqa: F401  (registers the zoo's tags with timm)

    scan_zoo.get_entry(name)  # a clear error for names outside the zoo
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _entry_point(name: str, doc: str):
    def fn(pretrained: bool = True, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name.replace(".", "_")
    fn.__doc__ = doc
    return fn


def _register_entry_points() -> None:
    from scan_zoo.zoo.cards import metrics_summary
    from scan_zoo.zoo.registry import ENTRIES

    for entry in ENTRIES:
        if entry.has_weights:
            doc = (
                f"{entry.arch} pretrained with {entry.method} on {entry.data.split(' (')[0]}: "
                f"{metrics_summary(entry)}. Backbone only (num_classes=0); kwargs go to timm.create_model."
            )
            globals()[entry.name.replace(".", "_")] = _entry_point(entry.name, doc)


_register_entry_points()
