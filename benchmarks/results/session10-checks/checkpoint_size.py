"""The size of a photos-vit-s16 checkpoint, counted (the README's "about 0.77 GB" and "87 MB"):
student and teacher parameters and AdamW's two moments of the trainable ones, fp32.

    python benchmarks/results/session10-checks/checkpoint_size.py
"""
from glsd.config import load_config
from glsd.models.heads import build_network, build_teacher

cfg = load_config("photos-vit-s16")
student = build_network(cfg)
teacher = build_teacher(cfg, student)
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
print(f"out_dim {cfg.model.out_dim}, student {count(student):,} parameters "
      f"(backbone {count(student.backbone):,}), teacher {count(teacher):,}, trainable {trainable:,}")
print(f"last.pt about {4 * (count(student) + count(teacher) + 2 * trainable) / 1e9:.3f} GB; "
      f"backbone.safetensors about {4 * count(student.backbone) / 1e6:.1f} MB")
