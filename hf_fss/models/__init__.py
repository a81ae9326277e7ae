"""The few-shot segmentation methods of hf_fss, one folder each."""
