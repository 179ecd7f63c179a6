"""Choosing a split by name, and slicing it, the same way for every kind of source (embedded, tfds, image folder).

A split is a name with an optional tfds slice: ``train``, ``train[:90%]``, ``train[90%:]``, ``validation[:1000]``,
``train[-500:]``. The slice is parsed by tfds's own ``ReadInstruction`` for every source, so ``train[:90%]`` selects
the same examples of an N-example split whether the split is a tfds dataset, an image folder or an embedded array:
examples [0, round(0.9 N)) in the source's order (percent bounds round to the closest example, as tfds does).
``train[:90%]`` and ``train[90%:]`` are disjoint and together are the whole split.

An accuracy computed on the images the model was trained on is not a result; ``held_out`` refuses such a pair of
splits unless the caller asks for a held-out slice (``holdout_splits``) or for the training images by name.
"""

import types

SPLIT_FLAGS = '--config.data.split_train / --config.data.split_eval'
HELD_OUT_FLAGS = '--split_eval=SPLIT (a held-out split), --holdout=PCT (hold out the last PCT% of the train split)'


def base_name(split):
    """'train[:90%]' -> 'train'."""
    return split.split('[')[0].strip()


def is_sliced(split):
    return '[' in split


def _instruction(split):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        instruction = tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as e:
        raise ValueError(
            f'split {split!r} is not a split name with an optional tfds slice (e.g. train, train[:90%], '
            f'train[90%:], validation[:1000]): {e}. Choose with {SPLIT_FLAGS}'
        ) from None
    if not isinstance(instruction, tfds.core.ReadInstruction) or instruction.unit == 'shard':
        raise ValueError(
            f'split {split!r}: name one split with an optional slice of examples or percent, not a sum of splits '
            f'or shards. Choose with {SPLIT_FLAGS}'
        )
    return instruction


def indices(split, num_examples):
    """range of the examples that ``split`` selects out of its base split of ``num_examples`` examples."""
    if not is_sliced(split):
        return range(num_examples)
    infos = {base_name(split): types.SimpleNamespace(num_examples=num_examples)}
    instruction = _instruction(split)
    try:
        (absolute,) = instruction.to_absolute(infos)
    except ValueError as e:
        raise ValueError(f'split {split!r} of {num_examples} examples: {e} Choose with {SPLIT_FLAGS}') from None
    return range(absolute.from_ or 0, num_examples if absolute.to is None else absolute.to)


def _bounds(split):
    """(start, stop, unit) of a slice with non-negative bounds (None = open end), or None when it has none."""
    if not is_sliced(split):
        return 0, None, None
    relative = _instruction(split)
    start, stop = relative.from_, relative.to
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        return None
    return start or 0, stop, relative.unit


def disjoint(a, b):
    """True when splits ``a`` and ``b`` provably share no example, whatever the split sizes: other base splits, or
    slices of one split in the same unit whose intervals do not meet (closest rounding keeps percent order)."""
    if base_name(a) != base_name(b):
        return True
    if not (is_sliced(a) and is_sliced(b)):
        return False
    ba, bb = _bounds(a), _bounds(b)
    if ba is None or bb is None or ba[2] != bb[2]:
        return False
    (sa, ea, _), (sb, eb, _) = ba, bb
    return (ea is not None and ea <= sb) or (eb is not None and eb <= sa)


def holdout_splits(split_train, percent):
    """(train, eval) slices that hold out the last ``percent``% of ``split_train`` (an unsliced split)."""
    if is_sliced(split_train):
        raise ValueError(f'--holdout slices the train split; it is already sliced ({split_train!r}).')
    if not 0 < percent < 100 or int(percent) != percent:
        raise ValueError(f'--holdout={percent}: give a whole percentage in 1..99.')
    keep = 100 - int(percent)
    return f'{split_train}[:{keep}%]', f'{split_train}[{keep}%:]'


def held_out(split_train, split_eval, *, holdout=None, eval_on_train=False, what='an accuracy'):
    """(split_train, split_eval, note) with an evaluation split that shares no example with the training split.

    ``holdout`` (a percentage) replaces them with ``holdout_splits``; ``eval_on_train`` keeps a pair that overlaps
    (the user asked for the training images by name); otherwise such a pair is a ValueError naming the flags.
    """
    if holdout:
        train, test = holdout_splits(split_train, holdout)
        return train, test, f'held out the last {holdout:g}% of {split_train}: trained on {train}, evaluated on {test}'
    if disjoint(split_train, split_eval):
        return split_train, split_eval, f'trained on {split_train}, evaluated on {split_eval} (held out)'
    if eval_on_train:
        return split_train, split_eval, f'evaluated on {split_eval}, which overlaps the training split (asked for)'
    raise ValueError(
        f'The evaluation split {split_eval!r} shares images with the training split {split_train!r}, so {what} '
        f'on it would be measured on training images. Pass {HELD_OUT_FLAGS}, or --eval_on_train to report it on '
        'the training images anyway.'
    )


def choose(source, splits, split, eval_splits, kind='split', slices=True):
    """``split`` checked against the ``splits`` that ``source`` has; 'auto' is the first of ``eval_splits`` there.

    Never falls back: a missing split is an error naming the splits that exist and the flags that choose one.
    ``slices`` accepts tfds slice syntax ('train[:10%]'), checked by its split name and parsed here.
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
    if slices and is_sliced(split):
        _instruction(split)
    if (base_name(split) if slices else split) not in splits:
        raise ValueError(f'{source} has no {kind} {split!r}; its {kind}s are {splits}. Choose with {SPLIT_FLAGS}')
    return split
