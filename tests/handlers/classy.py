"""A class-based handler with initialize/handle, the other shape TorchServe accepts."""


class Doubler:
    def initialize(self, context):
        self.factor = context.model_yaml_config.get("handler", {}).get("factor", 2)

    def handle(self, data, context):
        return [[x * self.factor for x in row["body"]] for row in data]

    def describe_handle(self):
        return {"factor": self.factor, "kind": "doubler"}
