"""Rendering a recipe into its run folder: run preparation (prepare), batching and the OOM
policy (batching), the image writer threads (writer), and the loop that joins them (run)."""

from imagegen.render.run import Event, RenderOptions, RenderSummary, render_recipe

__all__ = ["Event", "RenderOptions", "RenderSummary", "render_recipe"]
