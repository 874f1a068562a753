"""Constitutional AI: constitutions, red teaming, critique-and-revise SFT, RLAIF labeling and the pipeline."""
