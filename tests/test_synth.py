"""The synthetic VQA generator (swiftvlm_kernels/apps/synth.py): deterministic, answers consistent with the
image, fine-grained answers carried by a few patches, inputs the LLaVA forward takes."""
import pytest
import torch

from swiftvlm_kernels.apps import synth


def test_deterministic_and_independent_of_order():
    a = [synth.sample(7, i) for i in range(12)]
    b = [synth.sample(7, i) for i in reversed(range(12))][::-1]
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and (x.question, x.answer, x.objects) == (y.question, y.answer, y.objects)
    other = [synth.sample(8, i) for i in range(12)]
    assert any(not torch.equal(x.image, y.image) for x, y in zip(a, other))
    # a pinned digest: the generator must not drift between versions (the shipped accuracy rests on it)
    digest = sum(int(s.image.sum()) * (i + 1) for i, s in enumerate(a)) + sum(len(s.answer) for s in a)
    assert digest == 288133898
    assert [(s.kind, s.answer) for s in a[:4]] == [("count", "zero"), ("count", "two"), ("coarse", "black"),
                                                   ("location", "r0c3")]


@pytest.mark.parametrize("kind", synth.KINDS)
def test_answers_follow_from_the_objects(kind):
    for i in range(40):
        s = synth.sample(3, i, kind=kind)
        assert s.kind == kind and s.answer in synth.VOCAB
        colours = [o.colour for o in s.objects]
        shapes = [o.shape for o in s.objects]
        if kind == "colour":
            assert shapes.count(s.question[-1]) == 1
            assert s.answer == colours[shapes.index(s.question[-1])]
        elif kind == "shape":
            assert colours.count(s.question[-1]) == 1
            assert s.answer == shapes[colours.index(s.question[-1])]
        elif kind == "count":
            assert s.answer == synth.NUMBERS[colours.count(s.question[-1])]
        elif kind == "location":
            match = [o for o in s.objects if (o.colour, o.shape) == (s.question[-2], s.question[-1])]
            assert len(match) == 1 and s.answer == f"r{match[0].cell[0]}c{match[0].cell[1]}"
        else:
            assert s.answer == s.background
        assert len({o.cell for o in s.objects}) == len(s.objects)


def test_objects_live_in_their_cells_patches():
    """An object's pixels fall in its cell's 3 x 3 patches; every other patch is pure background."""
    s = synth.sample(5, 1, kind="location")
    bg = torch.tensor(synth.BACKGROUNDS[s.background], dtype=torch.uint8)[:, None, None]
    differs = (s.image != bg).any(0)  # [96, 96]
    per_patch = differs.view(12, 8, 12, 8).any(3).any(1)  # patch size 8
    want = torch.zeros(12, 12, dtype=torch.bool)
    for o in s.objects:
        r, c = o.cell
        want[3 * r:3 * r + 3, 3 * c:3 * c + 3] = per_patch[3 * r:3 * r + 3, 3 * c:3 * c + 3]
        assert per_patch[3 * r:3 * r + 3, 3 * c:3 * c + 3].sum() >= 5  # the shape covers most of its cell
    assert torch.equal(per_patch, want)
    assert len(s.cells_in_question()) == 1


def test_batch_inputs():
    samples = [synth.sample(0, i) for i in range(4)]
    inputs = synth.batch(samples, num_patches=144)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[0] == 4 and mask.shape == ids.shape and inputs["pixel_values"].shape == (4, 3, 96, 96)
    image_id = len(synth.VOCAB)
    assert ((ids == image_id).sum(1) == 144).all()
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == 0).all()  # left padding with <pad>
    assert [synth.VOCAB[a] for a in inputs["answers"].tolist()] == [s.answer for s in samples]


def test_errors():
    with pytest.raises(ValueError, match="^kind"):
        synth.sample(0, 0, kind="size")
    with pytest.raises(ValueError, match="^max_objects"):
        synth.sample(0, 0, max_objects=9)


def test_more_questions_are_deterministic_distinct_and_answered_by_the_image():
    for i in range(60):
        s = synth.sample(0, i)
        more = synth.more_questions(s, 3, 0, i)
        assert more == synth.more_questions(synth.sample(0, i), 3, 0, i)
        assert len({s.question, *(q for _, q, _ in more)}) == 4  # nothing asked twice: no answer to copy
        colours = [o.colour for o in s.objects]
        shapes = [o.shape for o in s.objects]
        for kind, q, answer in more:
            assert answer in synth.VOCAB
            if kind == "colour":
                assert shapes.count(q[-1]) == 1 and answer == colours[shapes.index(q[-1])]
            elif kind == "shape":
                assert colours.count(q[-1]) == 1 and answer == shapes[colours.index(q[-1])]
            elif kind == "count":
                assert answer == synth.NUMBERS[colours.count(q[-1])]
            elif kind == "location":
                match = [o for o in s.objects if (o.colour, o.shape) == (q[-2], q[-1])]
                assert len(match) == 1 and answer == f"r{match[0].cell[0]}c{match[0].cell[1]}"
            else:
                assert answer == s.background
    with pytest.raises(ValueError, match="k: expected at most the distinct questions"):
        synth.more_questions(synth.sample(0, 0), 500, 0, 0)
