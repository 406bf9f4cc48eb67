"""Scoring masks with the DAVIS-2017 measures: per-frame J and F (`measures`), index masks read and
checked (`masks`), sequence and dataset scores (`sequences`), folders of PNGs (`folders`) and the
`stm score` command (`cli`)."""
