"""Lightning callbacks that watch the health of the gradients."""

__all__: list[str] = []
