"""The weight zoo: registry, Hub download/verify and publish, the timm bridge, model cards."""
