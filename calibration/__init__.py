"""The field engineer's toolkit, `edge-calibrate`: intrinsics, extrinsics, belt pose and checks.

It builds on the node (`edge`): the calibration file format the node reads lives in
`edge.capture.calibration`, and the belt check the node runs in `edge.perception.belt_check`.
Nothing in `edge` imports this package.
"""
