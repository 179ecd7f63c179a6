"""Downstream evaluation of pretrained encoders: checkpoint loading and export, frozen features, linear / ridge / kNN
probes, and full fine-tuning. Entry points: ``python -m launch.{export,probe,finetune}`` (docs/evaluation.md)."""
