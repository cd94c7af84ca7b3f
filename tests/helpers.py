"""Shared test settings: the tiny synthetic benchmark that end-to-end tests train on."""

import functools

# 4 classes x 4 videos (3 training, 1 validation) at 32 px, 4 frames, one epoch of batch 4, a
# width-4 tiny backbone from scratch
TINY_RUN = [
    "data.synthetic.classes=4",
    "data.synthetic.videos_per_class=4",
    "data.synthetic.val_videos_per_class=null",
    "data.synthetic.size=32",
    "data.num_frames=4",
    "data.short_side=32",
    "data.crop=32",
    "optim.batch_size=4",
    "optim.epochs=1",
    "model.width=4",
    "model.weights=null",  # the project's pretrained weights are for width 16
    "eval.batch_size=8",
]


def synthetic_clips(per_class: int = 4, classes: int = 12, size: int = 32, frames: int = 8,
                    seed: int = 0, kind: str = "finegrained"):  # fmt: skip
    """Real clips of the synthetic benchmark (rendered, not encoded), as model input.

    ``(clips (B, 3, T, size, size) float normalised, labels (B,))``, TSN-sampled centre frames,
    ``per_class`` videos of each of the first ``classes`` classes, class-interleaved.
    """
    return _synthetic_clips(per_class, classes, size, frames, seed, kind)


@functools.lru_cache(maxsize=8)
def _synthetic_clips(per_class, classes, size, frames, seed, kind):
    import torch

    from finegrain.datasets.pipeline import to_model_input
    from finegrain.datasets.sampling import tsn_indices
    from finegrain.datasets.synthetic import render

    clips, labels = [], []
    for k in range(per_class):
        for c in range(classes):
            video, _ = render(c, size=size, seed=seed, index=1000 * c + k, kind=kind)
            clips.append(torch.from_numpy(video[tsn_indices(len(video), frames, train=False)[0]]))
            labels.append(c)
    return to_model_input(torch.stack(clips)), torch.tensor(labels)
