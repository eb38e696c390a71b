"""DeferredSeg method layer shared by sites and coordinator: model, losses, routing, metrics, data."""
