"""minilora's benchmarks, side by side with PEFT and bitsandbytes (run from the repository root).

    python -m bench ...          layers, NF4 kernels, host time, training steps, the sweeps (`bench/__main__.py`)
    python bench/paged_gpu.py    PagedAdamW against torch.optim.AdamW and bitsandbytes

Files: `common.py` (the row record, checks, output, targets), `layers.py` (sections layers and host, the
crossover), `nf4.py`, `sweep.py` (sections buildsweep and paths), `train.py`; `NOTES.md` says how the
figures in `results/` were reached.
"""
