"""Serve the deployment ``sela/full`` from this checkout (``make run`` starts it in the background)."""

from flows.full import sela

if __name__ == "__main__":
    sela.serve(name="full", description="Unlabelled images -> versioned SeLa label set (see README)")
