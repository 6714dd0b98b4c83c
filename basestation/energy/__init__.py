"""Energy model, convergence bound, calibration and precision solver (Kim, Saad, Mozaffari, Debbah 2022).

Pure math: nothing here touches the network or the store; the basestation loop
feeds records in and stores what comes out.
"""
