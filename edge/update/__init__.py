"""Fleet updates: signed release bundles (`bundle`), an atomic release store (`store`), the
health gate (`health`) and the updater that commits or rolls back (`updater`). The
`edge-node update` commands live in `edge.commands.update`."""
