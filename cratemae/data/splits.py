"""Choosing a split by name, the same way for every kind of source (embedded, tfds, image folder)."""

SPLIT_FLAGS = '--config.data.split_train / --config.data.split_eval'


def choose(source, splits, split, eval_splits, kind='split', slices=False):
    """``split`` checked against the ``splits`` that ``source`` has; 'auto' is the first of ``eval_splits`` there.

    Never falls back: a missing split is an error naming the splits that exist and the flags that choose one.
    ``slices`` accepts tfds slice syntax ('train[:10%]'), checked by its split name.
    """
    splits = list(splits)
    if split == 'auto':
        found = [s for s in eval_splits if s in splits]
        if not found:
            raise ValueError(
                f'{source} has no evaluation split ({", ".join(eval_splits)}); its {kind}s are {splits}. '
                f'Choose one with {SPLIT_FLAGS}'
            )
        return found[0]
    if (split.split('[')[0] if slices else split) not in splits:
        raise ValueError(f'{source} has no {kind} {split!r}; its {kind}s are {splits}. Choose with {SPLIT_FLAGS}')
    return split
