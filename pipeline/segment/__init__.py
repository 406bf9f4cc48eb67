"""`stm segment` over many videos (a dataset or a folder of video files) on a pool of Ray actors.

cli: the command's arguments and dispatch (one video -> stm_core.segment, no Ray); sources: finding
and reading videos; worker: the actor; outputs: OUT's folders, overlays and segment.json; stage: the driver.
"""
