"""`etfs-server`: exports directories to authenticated etfs clients and streams files to peers.

Modules: `config` (server.yaml), `acl` (rights), `exports` (path confinement),
`handlers` (control requests), `server` (listeners and connections), `transfer`
(server-to-server data path and transfer records), `main` (command line).
"""
