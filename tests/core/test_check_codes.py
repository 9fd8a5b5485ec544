"""Every modality refuses code ids its codebook cannot decode, with the same check."""

from __future__ import annotations

import pytest
import torch

from provq_lightning.tokens.codes import check_codes
from provq_lightning.topodisc import TopoDiscTokenizer


@pytest.mark.parametrize("codes", [[0, 8], [-1, 3], []], ids=["above", "below", "empty"])
def test_code_ids_outside_the_codebook_are_refused(codes):
    model = TopoDiscTokenizer(num_codes=8)
    with pytest.raises(ValueError, match=r"^code ids must lie in \[0, 8\); got shape"):
        model.decode_codes(torch.tensor(codes, dtype=torch.long))
    assert model.decode_codes(torch.tensor([0, 7])).shape == (2, 2)


def test_a_missing_token_is_allowed_where_the_modality_has_one():
    check_codes(torch.tensor([-1, 0, 7]), 8, missing=-1)
    with pytest.raises(ValueError, match=r"^token ids must lie in \[0, 8\) or be -1$"):
        check_codes(torch.tensor([-2, 0]), 8, missing=-1)
    with pytest.raises(ValueError, match="^cannot decode an empty token sequence$"):
        check_codes(torch.tensor([], dtype=torch.long), 8, missing=-1)
