"""The HTTP face: Cinder's v2/v3 routes, microversions, noauth tokens, request
validation, JSON views and Cinder-style fault bodies. Knows HTTP; defers every rule to
:mod:`blockvault.service`."""
