"""The method's maths, as the spec writes it: rectified-flow conventions (`flow`), Eq. 7's keyed noise
neighbourhood (`noise`), Eq. 11's group advantages (`advantages`) and the deterministic ODE solvers (`solvers`).

Small flat modules over plain tensors; they import nothing from the package but each other and `config`.
Layers (docs/design.md): `flow`, `noise` 0; `advantages`, `solvers` 1.
"""
