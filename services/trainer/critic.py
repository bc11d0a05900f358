"""The critic V(s): a scalar value head on a transformer backbone, started from the policy or a reward model."""

from __future__ import annotations

import torch
from transformers import AutoModel, PreTrainedModel

from shared.modeling import ModelConfig, load_sequence_classifier, resolve_device, torch_dtype


class Critic(torch.nn.Module):
    """V(s): a scalar value head on a transformer backbone (``AutoModel``, any architecture).

    The head is kept in float32 whatever the backbone dtype: values are regression targets of a few units and
    bf16's 3 significant digits would make the value loss noisy.
    """

    def __init__(self, backbone: PreTrainedModel, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_policy(cls, config: ModelConfig) -> Critic:
        """The base transformer of a causal LM and a zero head, so that values start at 0."""
        backbone = AutoModel.from_pretrained(config.path, dtype=torch_dtype(config.dtype), use_safetensors=True)
        head = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return cls(backbone, head).to(resolve_device(config.device))

    @classmethod
    def from_reward_model(cls, config: ModelConfig) -> Critic:
        """The backbone and scoring head of a ``num_labels=1`` sequence classifier: the critic starts as the RM.

        The RM scores a sequence from the hidden state of its last token, so the critic's value at that token
        equals the score (exactly so for last-token-pooling models such as Llama; BERT-like models pool elsewhere).
        """
        classifier = load_sequence_classifier(config)
        scoring = next(
            (
                module
                for name in ("score", "classifier")  # Llama/Mistral/GPT-NeoX name it score, BERT-like classifier
                if isinstance(module := getattr(classifier, name, None), torch.nn.Linear)
            ),
            None,
        )
        if scoring is None or scoring.out_features != 1:
            raise ValueError(f"critic.path {config.path}: no single-output linear scoring head (score/classifier)")
        head = torch.nn.Linear(scoring.in_features, 1, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(scoring.weight)
            head.bias.copy_(scoring.bias if scoring.bias is not None else torch.zeros(1))
        return cls(classifier.base_model, head).to(resolve_device(config.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, L) float32 values, one per position (the state after that token)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # the head in float32 under autocast too
            # A tensor of its own, not a view of the head's output: FSDP2 warns that an in-place op on a view
            # returned by a sharded module would skip its pre-backward hook.
            return self.head(hidden.float()).squeeze(-1).clone()
