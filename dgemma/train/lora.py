"""LoRA adapters moved to dgemma/model/lora.py (the loader merges an adapter directory into its base model, so the
model package owns them); this name stays so that `from dgemma.train.lora import ...` keeps working."""

from ..model.lora import (ADAPTER_FILE, CONFIG_FILE, TARGETS, LoRAConfig, LoRAExperts, LoRALinear, apply_lora,
                          load_adapter, load_lora_state_dict, load_merged, lora_config, lora_state_dict, merge_lora,
                          save_adapter)

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "TARGETS", "LoRAConfig", "LoRAExperts", "LoRALinear", "apply_lora",
           "load_adapter", "load_lora_state_dict", "load_merged", "lora_config", "lora_state_dict", "merge_lora",
           "save_adapter"]
