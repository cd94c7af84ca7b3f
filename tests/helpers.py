"""Shared test settings: the tiny synthetic benchmark that end-to-end tests train on."""

# 4 classes x 4 videos at 32 px, 4 frames, one epoch of batch 4, a width-4 tiny backbone
TINY_RUN = [
    "data.synthetic.classes=4",
    "data.synthetic.videos_per_class=4",
    "data.synthetic.size=32",
    "data.num_frames=4",
    "data.short_side=32",
    "data.crop=32",
    "optim.batch_size=4",
    "optim.epochs=1",
    "model.width=4",
    "eval.batch_size=8",
]
