"""Incident communications: who is told what, when, on which channel, in which words.

The controller decides and acts; this package speaks. `Communicator` listens to the controller's
events and is ticked by it each cycle; the lifecycle, cadence and ETA rules are pure functions in
`lifecycle`, the words are Jinja2 templates (`templates`), and humans steer through `commands`.
"""
