import pytest
import torch

from minilora.course.tasks import accuracy, encode, load_classifier, make_sentiment_task, train_classifier


def test_task_is_deterministic_balanced_and_disjoint():
    tr, te = make_sentiment_task(300, 100, seed=3)
    assert (tr, te) == make_sentiment_task(300, 100, seed=3)
    assert not {e.text for e in tr} & {e.text for e in te}
    share = sum(e.label for e in tr) / len(tr)
    assert 0.35 < share < 0.65


def test_labels_follow_negation_and_but():
    tr, _ = make_sentiment_task(400, 0, seed=1)
    for e in tr:
        last = e.text.split(", but ")[-1]
        positive_word = any(f" {w}" in last for w in ("good", "great", "wonderful", "excellent", "delightful",
                                                      "enjoyable", "superb", "charming", "brilliant",
                                                      "pleasant", "fun", "moving"))
        assert e.label == int(positive_word != (" not " in last)), e


def test_random_weight_classifier_trains_a_few_steps():
    tok, model = load_classifier(pretrained=False)
    assert tok is None
    tr, te = make_sentiment_task(64, 32)
    data = encode(None, tr, max_length=12)
    assert data["input_ids"].shape == (64, 12)
    losses = train_classifier(model, data, steps=2, lr=1e-4, batch_size=16)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert 0.0 <= accuracy(model, encode(None, te, max_length=12)) <= 1.0
    with pytest.raises(ValueError, match="no trainable"):
        for p in model.parameters():
            p.requires_grad_(False)
        train_classifier(model, data, steps=1)
