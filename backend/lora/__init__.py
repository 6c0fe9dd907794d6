"""LoRA: reading PEFT adapter folders, the layers that own adapter slots, the kernel wrapper, the tiers."""
