import math

import pytest
import torch

from utils.metrics import AverageMeter, ConfusionMatrix, MeterGroup, segmentation_metrics


def test_average_weights_batches_by_size():
    meter = AverageMeter()
    meter.update(1.0, n=10)      # a full batch
    meter.update(0.0, n=30)
    assert meter.avg == 0.25     # not the mean of batch means (0.5)


def test_tensor_values_accumulate_without_grad():
    meter = AverageMeter()
    weight = torch.ones((), requires_grad=True)
    meter.update(weight * 2, n=3)
    meter.update(torch.tensor(4.0), n=1)
    assert math.isclose(meter.avg, 2.5)
    assert not meter.total.requires_grad


def test_empty_meter_is_nan_and_reset_clears():
    meter = AverageMeter()
    assert math.isnan(meter.avg)
    meter.update(3.0, 2)
    meter.reset()
    assert math.isnan(meter.avg)


def test_group_matches_whole_data_set_accuracy():
    correct = torch.tensor([1, 1, 1, 0, 0, 1, 0])       # 4 of 7 right
    group = MeterGroup()
    for batch in (correct[:4], correct[4:]):             # batches of 4 and 3
        group.update({"accuracy": batch.float().mean()}, n=len(batch))
    assert math.isclose(group.averages("val/")["val/accuracy"], 4 / 7)


def test_best_value_tracks_the_best_epoch_and_early_stopping():
    from utils.metrics import BestValue

    best = BestValue("max", patience=2)
    assert [best.update(v, epoch) for epoch, v in enumerate([0.5, 0.7, float("nan"), 0.6], start=1)] \
        == [True, True, False, False]
    assert (best.value, best.epoch, best.bad_epochs, best.patience_spent) == (0.7, 2, 2, True)
    restored = BestValue("max", patience=3)
    restored.load_state_dict(best.state_dict())
    assert (restored.value, restored.epoch, restored.bad_epochs, restored.patience_spent) == (0.7, 2, 2, False)
    assert BestValue("min").update(1.0, 1) and not BestValue("min", None).patience_spent


# ----------------------------------------------------------------------------- segmentation (ERFNet)


def test_metrics_of_hand_made_confusion_matrices():
    # rows: ground truth, columns: prediction; class 2 is in neither
    scores = segmentation_metrics(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)
    assert scores["class_accuracy"][:2] == pytest.approx([0.75, 1.0]) and math.isnan(scores["class_accuracy"][2])
    assert scores["mean_class_accuracy"] == pytest.approx(0.875)
    assert scores["iou"][:2] == pytest.approx([3 / 4, 2 / 3]) and math.isnan(scores["iou"][2])
    assert scores["mIoU"] == pytest.approx((3 / 4 + 2 / 3) / 2)

    # class 1 predicted but never true: IoU 0 counts in the mean, its accuracy is undefined
    scores = segmentation_metrics(torch.tensor([[2, 2], [0, 0]]))
    assert scores["iou"] == [0.5, 0.0] and scores["mIoU"] == 0.25
    assert scores["mean_class_accuracy"] == 0.5 and math.isnan(scores["class_accuracy"][1])

    scores = segmentation_metrics(torch.eye(4, dtype=torch.int64) * 7)
    assert scores["pixel_accuracy"] == scores["mean_class_accuracy"] == scores["mIoU"] == 1.0
    assert math.isnan(segmentation_metrics(torch.zeros(3, 3))["mIoU"])


def test_confusion_matrix_counts_and_ignores_255():
    labels = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]], dtype=torch.uint8)
    predictions = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 1]])
    matrix = ConfusionMatrix(3)
    matrix.update(predictions, labels)
    matrix.update(predictions[:1], labels[:1])
    assert matrix.counts.tolist() == [[2, 2, 0], [0, 3, 0], [1, 0, 1]]
    assert matrix.all_reduce().counts.sum() == 9            # one process: unchanged


# ----------------------------------------------------------------------------- the monitored metric, the running loss


def test_monitor_keeps_the_best_and_says_why_training_stops():
    from utils.errors import ConfigError
    from utils.metrics import Monitor

    monitor = Monitor("val/accuracy", "max", patience=2, stop_at=0.9)
    assert monitor.observe({"val/accuracy": 0.5}, 1) and monitor.stop_after({"val/accuracy": 0.5}, 1) is None
    assert not monitor.observe({"val/accuracy": 0.4}, 2) and not monitor.observe({"val/accuracy": 0.45}, 3)
    status, line = monitor.stop_after({"val/accuracy": 0.45}, 3)
    assert status == "early_stopped" and "not improved for 2 validations (best 0.5 at epoch 1)" in line
    assert monitor.stopped_before()[0] == "early_stopped"
    assert monitor.summary({"val/accuracy": 0.45}) == {"val/accuracy": 0.45, "best/val/accuracy": 0.5}

    target = Monitor("val/loss", "min", stop_at=0.1)
    target.observe({"val/loss": 0.05}, 4)
    assert target.stop_after({"val/loss": 0.05}, 4) == ("reached_target",
                                                         "stop_at: val/loss reached 0.05 (target 0.1) at epoch 4")
    assert target.stopped_before()[0] == "reached_target" and not target.reached(math.nan)
    with pytest.raises(ConfigError, match='monitor "val/loss" is not among the validation metrics \\(val/acc\\)'):
        target.observe({"val/acc": 1.0}, 5)
    nothing = Monitor(None)
    assert not nothing.observe({"val/loss": 1.0}, 1) and nothing.stop_after({}, 1) is None
    assert nothing.summary({"val/loss": 1.0}) == {"val/loss": 1.0}


# On an accelerator the losses wait as tensors until fold(); on the CPU they are added at once.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the losses wait as tensors on an accelerator only"))])
def test_running_loss_is_the_sample_weighted_mean_and_resumes_from_its_state(device):
    from utils.metrics import RunningLoss

    losses, sizes = [1.0, 2.0, 4.0], [10, 10, 5]
    running = RunningLoss()
    running.add(torch.tensor(losses[0], device=device), sizes[0])
    running.fold()
    running.add(torch.tensor(losses[1], device=device, requires_grad=True) * 1, sizes[1])   # detached when kept
    state = running.state_dict()                      # folds what is pending
    assert state == {"loss_sum": 30.0, "sample_count": 20}
    resumed = RunningLoss()
    resumed.load_state_dict(state)
    resumed.add(torch.tensor(losses[2], device=device), sizes[2])
    assert resumed.epoch_mean() == pytest.approx(50 / 25)
    assert math.isnan(RunningLoss().epoch_mean())


def test_epoch_line_and_metrics_table():
    from utils.metrics import epoch_line, metrics_table

    assert epoch_line(2, 5, {"train/epoch_loss": 0.123456, "val/epochs": 3}, True, 1.26) == \
        "epoch 2/5  train/epoch_loss 0.1235  val/epochs 3  (best)  [1.3s]"
    assert metrics_table({"test/loss": 0.5, "test/accuracy": 0.25}) == \
        "  test/loss      0.5000\n  test/accuracy  0.2500"
