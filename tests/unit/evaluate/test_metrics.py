import math

import numpy as np
import pytest
import torch

from bayeskd.evaluate import metrics as M


def test_rouge_l_on_hand_built_cases():
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert M.rouge_l("", "") == 1.0 and M.rouge_l("x", "") == 0.0
    assert M.rouge_l("dog", "the cat") == 0.0
    # LCS("the cat is here", "the big cat here") = "the cat here" = 3; P = 3/4, R = 3/4
    assert M.rouge_l("the cat is here", "the big cat here") == pytest.approx(0.75)
    # LCS = 2 ("a b"), P = 2/2, R = 2/4 -> F = 2/3; case and punctuation tokens count
    assert M.rouge_l("A b", "a x b .") == pytest.approx(2 / 3)


def test_bits_per_byte():
    assert M.bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
    assert M.bits_per_byte(0.0, 0) == 0.0


def test_token_nll_matches_cross_entropy():
    z = torch.randn(5, 7)
    y = torch.tensor([0, 3, 6, 2, 2])
    assert torch.allclose(M.token_nll(z, y), torch.nn.functional.cross_entropy(z, y, reduction="none"))


def test_kl_dense_hand_built():
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.25, 0.5]])
    assert M.kl_dense(p, q)[0] == pytest.approx(math.log(2))
    assert M.kl_dense(p, p)[0] == pytest.approx(0.0)
    assert M.kl_dense(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0] > 60  # q = 0 where p > 0: huge, finite


def test_fidelity_and_smoothed_one_hot():
    one_hot = M.smoothed_one_hot(np.array([1, 0]), 4, 0.3)
    assert np.allclose(one_hot.sum(1), 1) and one_hot[0, 1] == pytest.approx(0.7) and one_hot[0, 0] == pytest.approx(0.1)
    p_t = np.array([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    f = M.fidelity(p_t, one_hot, np.array([1, 0]))
    assert f["top1"].tolist() == [1.0, 1.0]
    assert f["nll"] == pytest.approx(-np.log([0.7, 0.7]))
    assert f["kl"] == pytest.approx(M.kl_dense(p_t, one_hot))
