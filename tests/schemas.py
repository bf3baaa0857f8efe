"""JSON schemas shared by the structured-output tests of the engine and the server."""

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "celsius": {"type": "number", "minimum": -40, "maximum": 50},
                   "sky": {"enum": ["sunny", "cloudy", "rainy"]}},
    "required": ["city", "celsius", "sky"], "additionalProperties": False,
}
