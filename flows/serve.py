"""Serve the deployments ``sela/full`` and ``sela/predict`` from this checkout (``make serve`` starts it in the
background)."""

from prefect import serve

from flows.full import sela
from flows.predict import predict

if __name__ == "__main__":
    serve(sela.to_deployment(name="full", description="Unlabelled images -> versioned SeLa label set (see README)"),
          predict.to_deployment(name="predict", description="New images -> labels of a published version (README)"))
