"""PPO's critic: a causal LM's backbone (MiniMind's or any transformers model's) + a scalar value head."""
import copy

import torch
from torch import nn

from model.loading import load_hf_backbone
from model.lora import copy_sharing
from trainer_utils import InputError, is_hf_folder, load_state_dict_file


class CriticModel(nn.Module):
    """A causal LM's backbone (its final norm included) + a zero-initialised scalar value head.

    The backbone is `getattr(lm, lm.base_model_prefix)`: MiniMindModel, or a transformers model's
    base (GPT2Model, LlamaModel, ...), whose first output is the last hidden state.
    """

    def __init__(self, backbone, hidden_size):
        super().__init__()
        self.model = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        # no key/value cache to build (and none that a recomputed block would fill twice)
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)[0]
        return self.value_head(hidden).squeeze(-1)  # [B, T]


def build_critic(actor, critic_weight=None, tokenizer=None, share_base=False):
    """The actor's backbone + a fresh value head; or, with `critic_weight`, a saved critic / actor .pth
    (MiniMind) or a transformers folder, whose backbone is used, with a reward model's score head as the
    value head (InstructGPT's initialisation) or a fresh one; it must read the policy's `tokenizer`.
    share_base (no critic_weight): the backbone's weights are the actor's own tensors, for a LoRA critic on a
    LoRA actor, whose base stays frozen in both: one base in memory, each model with its own adapters."""
    if share_base and critic_weight:
        raise ValueError("share_base builds the critic on the actor's own weights; a critic_weight has its own")
    if critic_weight and is_hf_folder(critic_weight):
        backbone, score = load_hf_backbone(critic_weight, tokenizer)
        critic = CriticModel(backbone, backbone.config.hidden_size)
        if score is not None:  # a reward model's head: the first values are its scores at each position
            with torch.no_grad():
                critic.value_head.weight.copy_(score.weight)
                critic.value_head.bias.copy_(score.bias if score.bias is not None else torch.zeros(1))
        return critic
    backbone = getattr(actor, actor.base_model_prefix)
    critic = CriticModel(copy_sharing(backbone, lambda p: True) if share_base else copy.deepcopy(backbone),
                         actor.config.hidden_size)
    if not critic_weight:
        return critic
    state = load_state_dict_file(critic_weight)
    try:
        if "value_head.weight" in state:  # a saved critic
            critic.load_state_dict(state, strict=True)
        else:  # an actor file: its backbone, with a fresh value head
            critic.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                                         strict=True)
    except RuntimeError as e:
        raise InputError(f"--critic_weight {critic_weight}: does not fit the actor "
                         f"(hidden {actor.config.hidden_size}, {actor.config.num_hidden_layers} layers): "
                         f"{str(e).splitlines()[0]}") from e
    return critic
