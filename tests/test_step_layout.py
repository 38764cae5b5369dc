"""A step's inputs laid out in one byte buffer (`Layout`) and moved there by one upload (`StepUpload`)."""

import pytest
import torch

from tensorjet.layers.step_layout import Layout, Part
from tensorjet.runtime.device_io import StepUpload


def test_parts_start_16_byte_aligned_and_read_back_what_was_written():
    head = Layout([Part("ids", 3), Part("lens", 5, torch.int32), Part("empty", 0), Part("last", 1)])
    tail = Layout([Part("tables", 3, torch.int32)], start=head.end)
    offsets = {name: offset for name, (offset, _) in {**head.parts, **tail.parts}.items()}
    # 3 int64 end at 24 -> 32; 5 int32 end at 52 -> 64; nothing -> 64; 1 int64 ends at 72 -> 80.
    assert offsets == {"ids": 0, "lens": 32, "empty": 64, "last": 64, "tables": 80}
    assert (head.end, tail.end) == (72, 92)
    values = {
        "ids": [1, -2, 3],
        "lens": [7, 8, 9, 10, 2**31 - 1],
        "empty": [],
        "last": [-1],
        "tables": [4, 5, 6],
    }
    buffer = StepUpload(torch.device("cpu"))([head, tail], values)
    assert buffer.dtype == torch.uint8 and buffer.shape[0] == tail.end
    views = {**head.views(buffer), **tail.views(buffer)}
    assert {name: view.tolist() for name, view in views.items()} == values
    assert views["lens"].dtype == torch.int32 and views["ids"].dtype == torch.long


def test_an_upload_into_a_static_buffer_leaves_its_other_bytes_and_checks_each_length():
    layout = Layout([Part("rows", 2), Part("lens", 2, torch.int32)])
    buffer = torch.full((64,), 7, dtype=torch.uint8)
    StepUpload(torch.device("cpu"))([layout], {"rows": [5, 6], "lens": [1, 2]}, out=buffer)
    assert layout.view(buffer, "rows").tolist() == [5, 6] and layout.view(buffer, "lens").tolist() == [1, 2]
    assert torch.all(buffer[layout.end :] == 7), "bytes past the layout are not the upload's"
    with pytest.raises(ValueError, match="part 'lens' holds 2 values, got 3"):
        StepUpload(torch.device("cpu"))([layout], {"rows": [5, 6], "lens": [1, 2, 3]}, out=buffer)


def test_uploads_take_two_staging_buffers_in_turn_each_growing_to_its_largest_step():
    """What a GPU's page-locked staging does (there each is rewritten only after its copy ran)."""
    upload = StepUpload(torch.device("cpu"))
    small, big = Layout([Part("a", 4)]), Layout([Part("a", 1000)])
    outs = [
        upload([small], {"a": [1, 2, 3, 4]}),
        upload([big], {"a": list(range(1000))}),
        upload([small], {"a": [5, 6, 7, 8]}),
        upload([big], {"a": list(range(1000, 2000))}),
    ]
    assert [small.view(outs[0], "a").tolist(), small.view(outs[2], "a").tolist()] == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    ]
    assert big.view(outs[1], "a").tolist() == list(range(1000))
    assert big.view(outs[3], "a").tolist() == list(range(1000, 2000))
    first, second = upload._staging
    assert first is not second and first.shape[0] == 4096 and second.shape[0] >= big.end
