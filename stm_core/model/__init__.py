"""The STM network (Oh et al., ICCV 2019) and the STRMN Fusion Cell, as stateless modules."""
