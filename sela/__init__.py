"""sela: balanced, versioned label sets from unlabelled images by self-labelling (SeLa, Asano et al., ICLR 2020).

The core is pure (it never imports Prefect or DVC, never prints) and is laid out as the pipeline runs:

- ``sela.data``: image sources, the ingest's checks, WebDataset shards and the training stream;
- ``sela.sinkhorn``: the Sinkhorn-Knopp solver (numpy, CuPy, row-sharded over torch.distributed);
- ``sela.learn``: networks, augmentations, inference, the self-labelling training loop, transfer;
- ``sela.labels``: the exported label set, its card, alignment to the parent version, metrics, evaluation, report;
- ``sela.registry``: published versions through git and DVC's command lines (``sela labels ...``);
- ``sela.config`` (the typed ``params.yaml``) and ``sela.paths`` (where each stage writes).
"""
