"""Built-in handlers, selectable by name with `tsctl archive --handler NAME`."""
