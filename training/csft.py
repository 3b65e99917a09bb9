"""C-SFT (stage 2): fine-tune the content encoder on trigger -> target pairs with multi-level InfoNCE.

    accelerate launch training/csft.py --config training/configs/csft_ml100k.yaml
    python training/csft.py --config training/configs/csft_ml100k.yaml --max-steps 50   # one process
    python training/csft.py --config ... --resume                                       # newest checkpoint

Writes output_dir/{config.json, checkpoints/, encoder/, metrics.json}; see mim_hf.csft.train.

--resume continues from the newest intact checkpoint under OUTPUT_DIR/checkpoints (exactly:
same metrics and weights as an uninterrupted run; no pickle is loaded; a changed configuration
is refused). Without it, a run refuses a folder that holds an earlier run's checkpoints; a
second run into a folder in use is refused too. See docs/training.md.

A missing input folder is named with the command that makes it; errors are one line
(--debug: the traceback). For N processes on CPU: ACCELERATE_USE_CPU=true torchrun
--nproc_per_node N training/csft.py ... (see docs/cli.md).
"""

from mim_hf.cli_support import run_stage
from mim_hf.csft.train import CSFTConfig, run

if __name__ == "__main__":
    run_stage(CSFTConfig, run, __doc__)
