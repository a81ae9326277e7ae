"""
Train a few-shot segmentation model episodically, on one CPU or many GPUs.

    accelerate launch scripts/train.py                     # the quickstart: hf_fss/recipes/ntrenet/quickstart_synthetic.yaml
    accelerate launch scripts/train.py --config recipes/ntrenet/pascal5i_resnet50.yaml --dataset data/pascal5i --fold 1
    accelerate launch --multi_gpu --num_processes 4 scripts/train.py --model-type ntrenet --dataset D \
        --benchmark pascal5i --fold 0 --shot 5 --output-dir outputs/ntrenet-pascal-f0-5shot
    accelerate launch scripts/train.py ... --resume-from-checkpoint latest

Values: defaults < the `--config` recipe < flags (`python scripts/train.py --help` lists them). The logic lives in
`hf_fss.training` (recipes: `hf_fss/recipes`, packaged; `--config recipes/...` finds them).

The same command, installed: `hf-fss train ...` (`hf_fss.cli`).
"""

from hf_fss.training import main  # `pip install -e .` (the README's first command) installs hf_fss

if __name__ == "__main__":
    raise SystemExit(main())
