"""An official-style TDM training iteration: the baseline of the training comparison (bench_training.py).

A re-statement, in our own words and for a diffusers ``UNet2DConditionModel``, of the training
iteration in the authors' public demo (github.com/Luo-Yihong/TDM, ``train_tdm_demo.py``, PixArt-α;
README launch flags ``--cfg 4.5 --total_steps 900 --use_huber --use_separate``). What it keeps,
because it is what a user of that script pays for:

* **three full network copies**: the student (``unet``) and the fake score (``unet_fake``) are full
  trainable copies of the teacher, each with its own AdamW (β = (0, 0.95), weight decay 1e-2, the
  student at lr / 5), and the teacher (``unet_sd``) is a third, frozen copy;
* the rollout ``generate_new(..., steps=4)`` runs the student **K times** (its last pass only makes
  the final sample), every pass followed by the x̂0 conversion and a re-noising ``add_noise``;
* per sample Python loops for gathering x_t and drawing the matching times (``torch.randint`` per
  sample, ``max(20, tensor)``: host round trips on a GPU);
* the fake-score update runs the student at x_t without grad, then **the teacher at x_τ, whose output
  is never used**, then the fake score with grad; the importance weight is the plain ratio
  ``exp(-½ mean ε_mix²) / exp(-½ mean z²)`` (not normalised over the batch), SNR capped at 5;
* the generator update runs the student with grad, then the teacher **conditional and unconditional
  in two separate passes** and the fake score, all without grad; every ``Predictor.predict`` call
  also re-noises its x̂0 to the next time (unused for one step); the target
  ``x̂0 + (D_c − D_f) + (w − 1)(D_c − D_u)``, the per-sample normaliser in float64, the pseudo-Huber
  loss (c = 1e-3); gradient norm clipped to 1;
* host synchronisations every iteration: ``avg_loss.item()`` after the generator loss and the two
  ``.item()`` of the progress-bar log.

What differs, and why:

* the network call is a UNet's ``unet(x, t, encoder_hidden_states=c).sample`` (ε-prediction, SD1.5's
  DDPM schedule), not PixArt's ``chunk(2)`` of a learned-sigma output;
* the unconditional condition is a fixed embedding given by the caller (the demo encodes "");
* the demo's generator update reuses the fake update's ``timesteps_mid_ori`` (drawn for the fake
  update's stages); with ``--use_separate`` that can make ``torch.randint(low, high)`` fail when the
  two draws pick different stages, so the stage ends are recomputed from the generator's own draw here
  (what the paper describes; it costs the same);
* the dtype is the caller's (fp32 on CPU; bf16 autocast on a GPU), no 8-bit Adam (bitsandbytes) and no
  gradient checkpointing, so that the comparison with tdm-fast is at equal precision, optimizer and
  recomputation; ``accelerator.gather`` of one process is the identity.

``timer`` (optional) is called as a context manager with a category name around each region, so
the iteration's time can be broken down like :class:`tdm_fast.perf.step_profiler.StepProfiler` does for
the trainer (same category names where the work is the same).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

UNUSED_TEACHER = "teacher fwd (fake update, unused)"


def extract_into_tensor(a, t, x_shape):
    b = t.shape[0]
    return a.gather(-1, t).reshape(b, *((1,) * (len(x_shape) - 1)))


def predicted_origin(model_output, timesteps, sample, alphas, sigmas):
    """ε-prediction → x̂0 (the demo's ``predicted_origin``, epsilon branch)."""
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    return (sample - sigmas * model_output) / alphas


class OfficialStyleTDM:
    """One official-style TDM iteration per :meth:`iteration` call.

    Args:
        teacher: a diffusers ``UNet2DConditionModel`` (kept as the frozen teacher; student and fake
            score are deep copies of it).
        noise_scheduler: a diffusers ``DDPMScheduler`` (its ``alphas_cumprod`` and ``add_noise``).
        conditions: ``conditions(batch, generator)`` → a dict of the UNet's keyword inputs
            (``encoder_hidden_states``, optionally ``added_cond_kwargs``) for one batch of prompts.
        uncond: the same dict for the empty prompt, batch ``batch_size``.
        sample_shape: latent shape without the batch dimension.
    """

    def __init__(self, teacher, noise_scheduler, conditions, uncond, sample_shape, batch_size, *, cfg=4.5,
                 total_steps=900, steps=4, learning_rate=1e-4, use_huber=True, use_separate=True,
                 use_randmid=False, autocast_dtype=None, latent_dtype=torch.float32, seed=0, timer=None):
        self.device = next(teacher.parameters()).device
        self.unet_sd = teacher.eval().requires_grad_(False)
        self.unet = copy.deepcopy(teacher).train().requires_grad_(True)
        self.unet_fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.noise_scheduler = noise_scheduler
        self.alpha_schedule = torch.sqrt(noise_scheduler.alphas_cumprod).to(self.device)
        self.sigma_schedule = torch.sqrt(1 - noise_scheduler.alphas_cumprod).to(self.device)
        self.conditions, self.uncond = conditions, uncond
        self.sample_shape, self.batch_size = tuple(sample_shape), batch_size
        self.cfg, self.total_steps, self.steps = cfg, total_steps, steps
        self.use_huber, self.use_separate, self.use_randmid = use_huber, use_separate, use_randmid
        self.autocast_dtype, self.latent_dtype = autocast_dtype, latent_dtype
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=learning_rate / 5, betas=(0.0, 0.95),
                                           weight_decay=1e-2, eps=1e-8)
        self.optimizer_d = torch.optim.AdamW(self.unet_fake.parameters(), lr=learning_rate, betas=(0.0, 0.95),
                                             weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.timer = timer
        self._phase = "rollout"
        self.train_loss = 0.0
        self.global_step = 0

    # -- helpers of the demo ------------------------------------------------------------------
    def _region(self, name):
        return self.timer(name) if self.timer is not None else nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _category(self, unet) -> str:
        grad = torch.is_grad_enabled()
        if unet is self.unet_sd:
            return UNUSED_TEACHER if self._phase == "fake" else "teacher fwd (cond+uncond, 2B)"
        if unet is self.unet:
            if self._phase == "rollout":
                return "student fwd (rollout, no grad)"
            return "student fwd (grad)" if grad else "student fwd (fake update, no grad)"
        return "fake fwd (grad)" if grad else "fake fwd (generator, no grad)"

    def _net(self, unet, x, t, cond):
        with self._region(self._category(unet)), self._autocast():
            return unet(x, t, **cond).sample

    def predict(self, score_model, noisy_samples, timesteps, cond, steps=1):
        """``Predictor.predict`` without CFG: ε and x̂0 at ``timesteps``, then the (unused for one step)
        re-noising of x̂0 to the next time."""
        for _ in range(steps):
            score_pred = self._net(score_model, noisy_samples, timesteps, cond)
            with self._region("TDM kernels (renoise, ddim_jump, losses)"):
                pred_latents = predicted_origin(score_pred, timesteps, noisy_samples, self.alpha_schedule, self.sigma_schedule)
                timesteps = timesteps - timesteps // steps
                noisy_samples = self.noise_scheduler.add_noise(pred_latents.detach(), score_pred, timesteps)
        return score_pred, pred_latents

    def add_noise(self, samples, noise, t1, t2):
        """``Predictor.add_noise``: the exact transition from t1 to t2 (noisy-sample matching)."""
        sigmas = extract_into_tensor(self.sigma_schedule, t1, samples.shape)
        alphas = extract_into_tensor(self.alpha_schedule, t1, samples.shape)
        sigmas_new = extract_into_tensor(self.sigma_schedule, t2, samples.shape)
        alphas_new = extract_into_tensor(self.alpha_schedule, t2, samples.shape)
        samples = samples / alphas * alphas_new
        beta = (sigmas_new**2 - (alphas_new / alphas * sigmas) ** 2) ** 0.5
        return (samples + beta * noise).to(self.latent_dtype)

    def obtain_mixed_noise(self, model_noise, noise, t1, t2):
        sigmas = extract_into_tensor(self.sigma_schedule, t1, model_noise.shape)
        alphas = extract_into_tensor(self.alpha_schedule, t1, model_noise.shape)
        sigmas_new = extract_into_tensor(self.sigma_schedule, t2, model_noise.shape)
        alphas_new = extract_into_tensor(self.alpha_schedule, t2, model_noise.shape)
        beta = (sigmas_new**2 - (alphas_new / alphas * sigmas) ** 2) ** 0.5
        return (model_noise / alphas * alphas_new * sigmas + beta * noise) / sigmas_new

    def compute_snr(self, timesteps):
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(timesteps.device)
        alpha = (alphas_cumprod**0.5)[timesteps].float()
        sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].float()
        return (alpha / sigma) ** 2

    def generate_new(self, noise, cond, steps):
        """The student's K-stage rollout (``generate_new``, ``return_mid=True``): K passes from T'-1."""
        T_ = torch.full((noise.shape[0],), self.total_steps - 1, device=self.device, dtype=torch.long)
        imgs_list, noisy_imgs_list, pure_noisy = [], [], noise
        for _ in range(steps):
            noisy_imgs_list.append(pure_noisy)
            noise_pred = self._net(self.unet, pure_noisy, T_, cond)
            with self._region("TDM kernels (renoise, ddim_jump, losses)"):
                latent = predicted_origin(noise_pred, T_, pure_noisy, self.alpha_schedule, self.sigma_schedule)
                imgs_list.append(latent)
                T_ = T_ - self.total_steps // steps
                pure_noisy = self.noise_scheduler.add_noise(latent, noise_pred, T_).to(self.latent_dtype)
        noisy_imgs_list.append(latent)
        return imgs_list, noisy_imgs_list

    def _draw(self, bsz, noisy_imgs_list, latents):
        """Per sample: a stage, its x_t, its time, the stage end and τ (the demo's per-sample loops)."""
        device, total = self.device, self.total_steps
        ind_t = torch.randint(1, self.steps + 1, (bsz,), generator=self.generator).to(device).long()
        noisy_latents = torch.randn_like(latents)
        for i in range(latents.shape[0]):
            noisy_latents[i] = noisy_imgs_list[ind_t[i]][i]
        timesteps_g = ind_t * total // self.steps - 1
        timesteps_mid_ori = timesteps_g - total // self.steps + 1
        timesteps_mid = timesteps_mid_ori.clone()
        if self.use_randmid:
            for i in range(latents.shape[0]):
                timesteps_mid[i] = torch.randint(int(timesteps_mid_ori[i]), int(timesteps_g[i]) - 20, (1,),
                                                 generator=self.generator)[0]
        timesteps = timesteps_g * 0
        for i in range(latents.shape[0]):
            lowt = max(20, timesteps_mid[i])
            upt = timesteps_g[i] - 10 if self.use_separate else total - 10
            timesteps[i] = torch.randint(int(lowt), int(upt), (1,), generator=self.generator)[0]
        return noisy_latents, timesteps_g, timesteps_mid, timesteps

    # -- one iteration ------------------------------------------------------------------------
    def iteration(self) -> dict:
        bsz = self.batch_size
        with self._region("data/noise (conditions, randn, stage draw)"):
            cond = self.conditions(bsz, self.generator)
            noise = torch.randn((bsz, *self.sample_shape), generator=self.generator).to(self.device, self.latent_dtype)
            latents = noise
        self._phase = "rollout"
        with torch.no_grad():
            imgs_list, noisy_imgs_list = self.generate_new(noise, cond, self.steps)
            noisy_imgs_list.reverse()

        # the fake score
        self._phase = "fake"
        self.unet_fake.requires_grad_(True)
        with torch.no_grad():
            with self._region("data/noise (conditions, randn, stage draw)"):
                noisy_latents, timesteps_g, timesteps_mid, timesteps = self._draw(bsz, noisy_imgs_list, latents)
            model_eps, model_latents = self.predict(self.unet, noisy_latents, timesteps_g, cond)
            with self._region("TDM kernels (renoise, ddim_jump, losses)"):
                ode = self.noise_scheduler.add_noise(model_latents, model_eps, timesteps_mid).to(self.latent_dtype)
                rand_noise = torch.randn_like(ode)
                noisy_model_latents = self.add_noise(ode.detach(), rand_noise, timesteps_mid, timesteps)
                mixed_noise = self.obtain_mixed_noise(model_eps, rand_noise, timesteps_mid, timesteps)
            self.predict(self.unet_sd, noisy_model_latents, timesteps, cond)  # its output is never read
        _, fake_latents = self.predict(self.unet_fake, noisy_model_latents, timesteps, cond)
        with self._region("TDM kernels (renoise, ddim_jump, losses)"):
            is_weight = torch.exp(-0.5 * (mixed_noise**2).view(bsz, -1).mean(dim=1)) / torch.exp(
                -0.5 * (rand_noise**2).view(bsz, -1).mean(dim=1))
            loss_score = F.mse_loss(fake_latents.float(), model_latents.float(), reduction="none")
            snr = self.compute_snr(timesteps)
            snr = torch.stack([snr, 5 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            loss_score = (loss_score.mean(dim=list(range(1, len(loss_score.shape)))) * snr * is_weight).mean()
        with self._region("fake bwd"):
            loss_score.backward()
        with self._region("optimizer (step, zero_grad, lr, clip, EMA)"):
            self.optimizer_d.step()
            self.optimizer_d.zero_grad()

        # the generator
        self._phase = "generator"
        with self._region("data/noise (conditions, randn, stage draw)"):
            noisy_latents, timesteps_g, timesteps_mid, timesteps = self._draw(bsz, noisy_imgs_list, latents)
        model_eps, model_latents = self.predict(self.unet, noisy_latents, timesteps_g, cond)
        with self._region("TDM kernels (renoise, ddim_jump, losses)"):
            ode = self.noise_scheduler.add_noise(model_latents, model_eps, timesteps_mid).to(self.latent_dtype)
            noisy_model_latents = self.add_noise(ode, torch.randn_like(ode), timesteps_mid, timesteps)
            self.compute_snr(timesteps)
            coop_samples = model_latents.detach().clone()
        with torch.no_grad():
            _, sd_latents = self.predict(self.unet_sd, noisy_model_latents, timesteps, cond)
            _, sd_latents_uncond = self.predict(self.unet_sd, noisy_model_latents, timesteps, self.uncond)
            _, fake_latents = self.predict(self.unet_fake, noisy_model_latents, timesteps, cond)
            with self._region("TDM kernels (renoise, ddim_jump, losses)"):
                coop_samples = coop_samples.detach().clone() + (sd_latents - fake_latents).detach().clone() + (
                    self.cfg - 1) * (sd_latents - sd_latents_uncond).detach().clone()
        with self._region("TDM kernels (renoise, ddim_jump, losses)"):
            sd_latents_cfg = sd_latents + (self.cfg - 1) * (sd_latents - sd_latents_uncond)
            dims = list(range(1, model_latents.dim()))
            weighting_factor = torch.abs(model_latents.double() - sd_latents_cfg.double()).mean(dim=dims, keepdim=True).detach()
            if self.use_huber:
                huber_c = 1e-3
                loss_instruct = torch.mean(
                    (torch.sqrt((model_latents.float() - coop_samples.detach().float()) ** 2 + huber_c**2) - huber_c)
                    / weighting_factor)
            else:
                loss_instruct = (F.mse_loss(model_latents.float(), coop_samples.detach().float(), reduction="none")
                                 / weighting_factor).mean()
        with self._region("other (python glue, .item(), casts)"):
            avg_loss = loss_instruct.repeat(bsz).mean()  # accelerator.gather of one process
            self.train_loss += avg_loss.item()
        with self._region("student bwd"):
            loss_instruct.backward()
        with self._region("optimizer (step, zero_grad, lr, clip, EMA)"):
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        self.global_step += 1
        with self._region("other (python glue, .item(), casts)"):
            logs = {"loss_score": loss_score.detach().item(), "loss_instruct": loss_instruct.detach().item()}
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"official-style iteration {self.global_step}: non-finite loss {logs}")
        return logs

    def networks(self):
        """(role, module) of the three copies: what the comparison hooks to count network passes."""
        return [("student", self.unet), ("fake", self.unet_fake), ("teacher", self.unet_sd)]
