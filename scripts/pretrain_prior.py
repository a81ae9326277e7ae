"""
Pretrain QGNet's prior extractor with the global + local contrastive loss (paper 000 §IV-A), on one CPU or many GPUs.

    accelerate launch scripts/pretrain_prior.py            # quickstart: hf_fss/recipes/prior/quickstart_synthetic.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/pretrain_prior.py --dataset data/pascal5i \
        --batch-size 32 --epochs 1000 --output-dir outputs/prior-pascal5i
    accelerate launch scripts/pretrain_prior.py ... --resume-from-checkpoint latest

`--output-dir` receives `model.safetensors` (the key encoder's backbone, hf_fss stage names), `config.json` and a
card; `DilatedResNet(...).load_weights(folder)` and QGNet's `prior_extractor_weights` read it. The logic lives in
`hf_fss.pretraining` (`python scripts/pretrain_prior.py --help` lists every flag).

The same command, installed: `hf-fss pretrain ...` (`hf_fss.cli`).
"""

from hf_fss.pretraining.training import main  # `pip install -e .` (the README's first command) installs hf_fss

if __name__ == "__main__":
    raise SystemExit(main())
