"""Everything that runs on a device: the fixed-point engine and local trainer,
the update codec, the power-meter reader, the MQTT edge runtime.

Stays light on purpose: numpy, pyserial and paho-mqtt only. Nothing in this
package imports ``basestation``, scikit-learn or matplotlib.
"""
