"""MCLDef: trigger synthesis, then model-contrastive purification."""
