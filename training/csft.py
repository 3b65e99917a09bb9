"""C-SFT (stage 2): fine-tune the content encoder on trigger -> target pairs with multi-level InfoNCE.

    accelerate launch training/csft.py --config training/configs/csft_ml100k.yaml
    python training/csft.py --config training/configs/csft_ml100k.yaml --max-steps 50   # one process
    python training/csft.py --config ... --resume                                       # newest checkpoint

Writes output_dir/{config.json, checkpoints/, encoder/, metrics.json}; see mim_hf.csft.train.

Resuming, refusals, errors, several CPU processes: mim_hf.cli_support.STAGE_HELP (in --help).
"""

from mim_hf.cli_support import run_stage
from mim_hf.csft.train import CSFTConfig, run

if __name__ == "__main__":
    run_stage(CSFTConfig, run, __doc__)
