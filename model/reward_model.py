"""`VLMForRewardModeling`: the VLM's backbone with a scalar head, scoring a conversation (image + prompt + answer).

Shaped like transformers' `*ForSequenceClassification` (e.g. `LlamaForSequenceClassification`): `model` is the
`VLMModel` (vision towers, projectors, LLM without its LM head) and `score` a bias-free `Linear(text_hidden, 1)` read
at each row's last real token, so a reward model loads with `AutoModelForSequenceClassification` once `import model`
has registered it, and the TRL/PEFT conventions for reward models (`num_labels=1`, a `score` head trained in full
under LoRA) hold unchanged.

    reward = VLMForRewardModeling.from_vlm("runs/tiny/sft/merged")  # backbone weights from a VLM, head at zero
    scores = reward(**processor(images=..., text=..., padding=True, return_tensors="pt")).logits  # [batch, 1]

With `config.likelihood_feature` (`from_vlm(..., likelihood=True, answer_start_ids=...)`), the reward also counts
the answer's log-likelihood under the VLM's LM head, which the model then keeps: `reward = score(h_last) + s * sum_t
log p(answer token_t | image, prompt, answer tokens before it)`, the answer being the tokens after the last
`config.answer_start_ids` (the tokens between the user's words and the answer: the end of the user turn and the
assistant's header), with `s` (`likelihood_scale`, a 1x1 linear layer) starting at 1. An SFT policy already ranks a verified answer above a wrong one by that likelihood (about 90%
of the demo's held-out pairs) where a zero head starts at chance, so training starts from the policy's own preference
instead of learning it again from a scalar per pair.

`ImageTextForRewardModeling` is the same for a stock VLM (LLaVA, Qwen2-VL, Idefics3, Gemma 3, Mllama, ...): its
base model (`LlavaModel`, ...: what `AutoModel` builds from the checkpoint's config) with the same head. transformers
has no sequence-classification class for these families.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_vlm import VLMConfig
from .modeling_vlm import VLMForConditionalGeneration, VLMModel, VLMPreTrainedModel


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[batch]` index of each row's last real token (the rightmost 1 of `attention_mask`), for left or right padding.

    Read from the mask rather than from `pad_token_id` (transformers' `*ForSequenceClassification` way): the VLM's
    tokenizers often pad with their end-of-turn token, which is exactly the last real token of a rendered answer.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(dim=-1)


class ScalarHead:
    """What both reward models share: the backbone's embeddings (no output embeddings unless the LM head is kept for
    the likelihood feature), and the score read at each row's last real token."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def keep_lm_head(self, config: PretrainedConfig, lm_head: nn.Module | None = None) -> None:
        """With `config.likelihood_feature`: the LM head (`lm_head`, shared, or a new one to load into, tied as the
        VLM ties it) and the likelihood's scale (`likelihood_scale`, a 1x1 linear layer, 1 at init)."""
        if not getattr(config, "likelihood_feature", False):
            return
        if not getattr(config, "answer_start_ids", None):
            raise ValueError("likelihood_feature needs config.answer_start_ids (the tokens that precede an answer)")
        text_config = config.get_text_config()
        self.lm_head = lm_head if lm_head is not None else nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.likelihood_scale = nn.Linear(1, 1, bias=False)
        # Tied to wherever this backbone keeps its input embeddings (`language_model.embed_tokens` for most).
        embeddings = self.model.get_input_embeddings()
        embed_name = next(name for name, module in self.model.named_modules() if module is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.{embed_name}.weight"}

    @property
    def likelihood_feature(self) -> bool:
        """Whether the reward counts the answer's log-likelihood (`config.likelihood_feature`)."""
        return hasattr(self, "likelihood_scale")

    def with_likelihood(
        self, logits: torch.Tensor, hidden_states: torch.Tensor, input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None, likelihood_tokens: torch.BoolTensor | None = None,
        predecessors: torch.LongTensor | None = None, score_positions: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """`logits` plus, with the likelihood feature, `likelihood_scale` of each score's answer log-likelihood
        (see `VLMForRewardModeling.forward` for `likelihood_tokens` and `predecessors`)."""
        if not self.likelihood_feature:
            return logits
        if likelihood_tokens is None:
            if input_ids is None or (attention_mask is not None and attention_mask.dim() != 2) or score_positions is not None:
                raise ValueError(
                    "the likelihood feature needs input_ids, and likelihood_tokens with predecessors for a 4-D "
                    "attention mask or score_positions (align.reward.pack_reward_pairs gives them)"
                )
            likelihood_tokens = answer_tokens(input_ids, attention_mask, self.config.answer_start_ids)[..., None]
            predecessors = previous_columns(input_ids)
        likelihood = self.log_likelihood(hidden_states, input_ids, likelihood_tokens, predecessors)
        return logits + self.likelihood_scale(likelihood.unsqueeze(-1).to(self.likelihood_scale.weight.dtype)).squeeze(-1)

    def log_likelihood(
        self, hidden_states: torch.Tensor, input_ids: torch.LongTensor, tokens: torch.BoolTensor,
        predecessors: torch.LongTensor,
    ) -> torch.Tensor:
        """`[batch, k]` float32: for each of the k scores, the summed log-probability of its `tokens`
        (`[batch, length, k]`), each predicted by the LM head from the hidden state at `predecessors`. The head runs
        only at the positions that predict a counted token (the text, not the visual tokens or the padding)."""
        rows, columns = tokens.any(-1).nonzero(as_tuple=True)
        sources = hidden_states[rows, predecessors.to(hidden_states.device)[rows, columns]]
        log_probs = self.lm_head(sources.to(self.lm_head.weight.dtype)).float().log_softmax(-1)
        picked = log_probs.gather(-1, input_ids[rows, columns, None].to(log_probs.device)).squeeze(-1)
        weights = tokens[rows, columns].to(device=picked.device, dtype=picked.dtype)
        total = torch.zeros(tokens.shape[0], tokens.shape[-1], dtype=picked.dtype, device=picked.device)
        return total.index_add(0, rows.to(picked.device), picked[:, None] * weights)

    def score_last_token(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`score` of each row's last real token (the rightmost 1 of `attention_mask`; without one, the last
        position): `[batch, 1]`."""
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            last = last_token_indices(attention_mask).to(hidden_states.device)
        else:
            last = torch.full((batch,), hidden_states.shape[1] - 1, device=hidden_states.device)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last]
        return self.score(pooled.to(self.score.weight.dtype))


class VLMForRewardModeling(ScalarHead, VLMPreTrainedModel):
    """The VLM's `VLMModel` backbone + `score`, a scalar reward per sequence (`num_labels` is always 1).

    Args:
        config: the VLM's `VLMConfig`; `num_labels` is set to 1 and `architectures` to this class.
        backbone: an existing `VLMModel` to wrap without copying (e.g. a VLM's `.model`, see `from_vlm`).
        lm_head: with `config.likelihood_feature`, an existing LM head to share (the VLM's, see `from_vlm`).
    """

    # A reward model saved by `from_vlm` or loaded from a plain VLM folder: the LM head is not part of it (unless
    # `likelihood_feature` keeps it), and the head and the likelihood's scale are new (`_init_weights`).
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    _keys_to_ignore_on_load_missing = [r"^score\.", r"^likelihood_scale\."]
    # Quantising the LLM only (QLoRA): the towers, projectors, adapters and the head stay full precision.
    modules_not_to_quantize = ("model.vision_towers", "model.projectors", "model.cross_attention", "score")

    def __init__(self, config: VLMConfig, backbone: VLMModel | None = None, lm_head: nn.Module | None = None):
        config.num_labels = 1
        config.architectures = [type(self).__name__]
        super().__init__(config)
        self.num_labels = 1
        self.model = backbone if backbone is not None else VLMModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, 1, bias=False)
        self.keep_lm_head(config, lm_head)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "score", None):
            # Zero head: before training every answer scores 0, so the Bradley-Terry loss starts at ln 2 and the
            # pairwise accuracy at chance (ties), whatever the backbone.
            init.zeros_(module.weight)
        if module is getattr(self, "likelihood_scale", None):
            # Scale 1: before training the reward is the conversation's log-likelihood, the policy's own preference.
            init.ones_(module.weight)

    @classmethod
    def from_vlm(
        cls,
        path_or_model: str | os.PathLike | VLMForConditionalGeneration,
        likelihood: bool = False,
        answer_start_ids: Sequence[int] | None = None,
        **kwargs,
    ) -> VLMForRewardModeling:
        """A reward model on a VLM's backbone, with a new (zero) head.

        Args:
            path_or_model: a saved VLM folder (its LM head is dropped on load), or a `VLMForConditionalGeneration`
                whose `.model` is shared, not copied (its weights are the reward model's).
            likelihood: keep the LM head and add the answer's log-likelihood to the reward
                (`config.likelihood_feature`, see the module docstring).
            answer_start_ids: with `likelihood`, the token ids that precede the answer in a rendered
                conversation (`config.answer_start_ids`; `align.reward.answer_start_ids` reads them off a processor).
            **kwargs: `from_pretrained` options for a folder (`dtype`, `quantization_config`, `attn_implementation`,
                ...); none for a model instance.

        Returns:
            The `VLMForRewardModeling`.
        """
        if likelihood and not answer_start_ids:
            raise ValueError("from_vlm(likelihood=True) needs answer_start_ids (align.reward.answer_start_ids)")
        if isinstance(path_or_model, VLMForConditionalGeneration):
            if kwargs:
                raise ValueError(f"from_vlm takes loading options only with a folder, got {sorted(kwargs)}")
            backbone = path_or_model.model
            config = copy.deepcopy(path_or_model.config)
            if likelihood:
                config.likelihood_feature, config.answer_start_ids = True, list(answer_start_ids)
            reward = cls(config, backbone=backbone, lm_head=path_or_model.lm_head if likelihood else None)
            return reward.to(backbone.get_input_embeddings().weight.device)
        if not os.path.isdir(path_or_model):
            raise ValueError(f"from_vlm needs a VLM folder or a VLMForConditionalGeneration, got {path_or_model!r}")
        if likelihood:
            config = kwargs.pop("config", None) or VLMConfig.from_pretrained(path_or_model)
            config.likelihood_feature, config.answer_start_ids = True, list(answer_start_ids)
            kwargs["config"] = config
        return cls.from_pretrained(path_or_model, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`; a bitsandbytes config without `llm_int8_skip_modules` gets
        `modules_not_to_quantize`, so only the LLM is quantised (as `VLMForConditionalGeneration.from_pretrained`)."""
        if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.llm_int8_skip_modules is None:
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = list(cls.modules_not_to_quantize)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return super().from_pretrained(*args, **kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        score_positions: torch.LongTensor | None = None,
        likelihood_tokens: torch.BoolTensor | None = None,
        predecessors: torch.LongTensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        r"""
        The inputs of `VLMForConditionalGeneration.forward` (see `VLMModel.forward` for the visual ones).

        Returns `logits` `[batch, 1]`: the score at each row's last real token (the rightmost 1 of
        `attention_mask`; without a mask, the last position). With a mask and no `position_ids`, positions count
        real tokens only, so a left-padded row scores exactly as the same row right-padded. `labels` (`[batch]`
        floats) give transformers' regression loss (MSE), as `*ForSequenceClassification` with `num_labels=1`.
        `score_positions` (`[batch, k]`) scores those positions instead (`logits` `[batch, k]`): several answers
        packed into one row (`align.reward.pack_reward_pairs`, whose 4-D mask has no last real token to find).

        With the likelihood feature, `likelihood_tokens` (`[batch, length, k]`) says which tokens' log-probabilities
        add to each of the k scores and `predecessors` (`[batch, length]`) which position's logits predict each
        token, as `pack_reward_pairs` gives them; by default (2-D mask, one score per row) the answer's tokens
        (`answer_tokens`: after the last `config.answer_start_ids`), each predicted from the column before it.
        """
        if position_ids is None and attention_mask is not None and cache is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_features=image_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=bool(use_cache),  # scoring never decodes further; a cache would only cost memory
            cross_attention_mask=cross_attention_mask,
            cross_attention_states=cross_attention_states,
            **kwargs,
        )
        if score_positions is not None:
            hidden = outputs.last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            logits = self.score(hidden[rows, score_positions.to(hidden.device)].to(self.score.weight.dtype)).squeeze(-1)
        else:
            logits = self.score_last_token(outputs.last_hidden_state, attention_mask)
        logits = self.with_likelihood(
            logits, outputs.last_hidden_state, input_ids, attention_mask, likelihood_tokens, predecessors, score_positions
        )

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def answer_tokens(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, answer_start_ids: Sequence[int]
) -> torch.BoolTensor:
    """`[batch, length]`: the real tokens after the last occurrence of `answer_start_ids` (the tokens that precede
    the answer, `config.answer_start_ids`) in each row: the answer, each predicted from the column before it.

    Raises:
        ValueError: a row holds no `answer_start_ids` (not a rendered conversation with an answer turn).
    """
    start = torch.as_tensor(list(answer_start_ids), dtype=input_ids.dtype, device=input_ids.device)
    width = input_ids.shape[1]
    if len(start) == 0 or len(start) > width:
        raise ValueError(f"answer_start_ids {list(answer_start_ids)} do not fit rows of {width} tokens")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    windows = input_ids.unfold(1, len(start), 1)  # [batch, width - m + 1, m]
    found = (windows == start).all(-1) & real.unfold(1, len(start), 1).all(-1)
    if not found.any(-1).all():
        missing = (~found.any(-1)).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {missing} hold no answer_start_ids {list(answer_start_ids)} (the tokens that precede the answer): "
            "the likelihood feature scores rendered conversations with an answer"
        )
    positions = torch.arange(found.shape[1], device=input_ids.device)
    first_answer = (positions * found).argmax(-1) + len(start)  # after the last occurrence
    return real & (torch.arange(width, device=input_ids.device)[None] >= first_answer[:, None])


def previous_columns(input_ids: torch.LongTensor) -> torch.LongTensor:
    """`[batch, length]`: each column's previous column (what predicts a token in an unpacked row)."""
    return (torch.arange(input_ids.shape[1], device=input_ids.device) - 1).clamp(min=0).expand_as(input_ids)


class ImageTextForRewardModeling(ScalarHead, PreTrainedModel):
    """A stock VLM's base model (`AutoModel` of its config: `LlavaModel`, `Qwen2VLModel`, `MllamaModel`, ...) with
    `score`, a bias-free `Linear(text_hidden, 1)` read at each row's last real token, as `VLMForRewardModeling`.

    Args:
        config: the stock VLM's config; `num_labels` is set to 1 and `architectures` to this class.
        backbone: an existing base model to wrap without copying (a loaded VLM's `.model`, see `from_vlm`).
        lm_head: with `config.likelihood_feature`, an existing LM head to share (the VLM's, see `from_vlm`).
    """

    config_class = PretrainedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    _keys_to_ignore_on_load_missing = [r"^score\.", r"^likelihood_scale\."]

    def __init__(self, config: PretrainedConfig, backbone: nn.Module | None = None, lm_head: nn.Module | None = None):
        config.num_labels = 1
        config.architectures = [type(self).__name__]
        super().__init__(config)
        self.num_labels = 1
        self.model = backbone if backbone is not None else AutoModel.from_config(config)
        self._no_split_modules = getattr(self.model, "_no_split_modules", None)
        self.score = nn.Linear(config.get_text_config().hidden_size, 1, bias=False)
        self.keep_lm_head(config, lm_head)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if module is getattr(self, "score", None):
            init.zeros_(module.weight)  # every answer scores 0 before training (see VLMForRewardModeling)
        if module is getattr(self, "likelihood_scale", None):
            init.ones_(module.weight)  # the reward starts as the policy's own preference (see VLMForRewardModeling)

    @classmethod
    def from_vlm(
        cls, vlm: PreTrainedModel, likelihood: bool = False, answer_start_ids: Sequence[int] | None = None
    ) -> ImageTextForRewardModeling:
        """A reward model on a loaded stock VLM's base model (`vlm.model`, shared, not copied), head at zero; with
        `likelihood`, the VLM's LM head shared too and the answer's log-likelihood added (see the module docstring;
        `answer_start_ids` from `align.reward.answer_start_ids`)."""
        if likelihood and not answer_start_ids:
            raise ValueError("from_vlm(likelihood=True) needs answer_start_ids (align.reward.answer_start_ids)")
        config = copy.deepcopy(vlm.config)
        if likelihood:
            config.likelihood_feature, config.answer_start_ids = True, list(answer_start_ids)
        reward = cls(config, backbone=vlm.model, lm_head=vlm.get_output_embeddings() if likelihood else None)
        return reward.to(vlm.get_input_embeddings().weight.device)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """A saved `ImageTextForRewardModeling` folder; the config class is the stock family's (`AutoConfig`)."""
        kwargs.setdefault("config", AutoConfig.from_pretrained(path))
        return super().from_pretrained(path, *args, **kwargs)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        r"""The stock model's inputs (`pixel_values`, `image_grid_thw`, `pixel_attention_mask`,
        `cross_attention_mask`, `token_type_ids`, ...); `logits` `[batch, 1]` at each row's last real token, plus the
        answer's log-likelihood with the likelihood feature."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=bool(use_cache), **kwargs)
        logits = self.score_last_token(outputs.last_hidden_state, attention_mask)
        logits = self.with_likelihood(logits, outputs.last_hidden_state, input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["ImageTextForRewardModeling", "VLMForRewardModeling", "answer_tokens", "last_token_indices", "previous_columns"]
