# jobworkerd on every client node of a Nomad cluster: a system job, registered in Consul,
# whose DNS gives jobctl fleets the SRV records of every server:
#   _jobworkerd._tcp.service.consul
# (jobctl: [fleets.nomad] srv = "_jobworkerd._tcp.service.consul", resolver = a Consul
# DNS address such as "127.0.0.1:8600"). Guide: docs/operations.md, "Many hosts". Not run
# here: no cluster on the machine that wrote it; the tests check that it parses and says
# what the guide says.
#
# Needs the docker driver with privileged containers and host volumes allowed on the
# clients (plugin "docker" { config { allow_privileged = true, volumes { enabled = true } } }),
# the image (Dockerfile), and
# the server's TLS files in /etc/jobworker/tls on each node (one CA; each server
# certificate's SANs name its node's address).
job "jobworkerd" {
  type = "system"

  group "jobworkerd" {
    network {
      port "grpc" {
        static = 50051
      }
    }

    service {
      name     = "jobworkerd"
      provider = "consul"
      port     = "grpc"
      tags     = ["jobworker"]

      # TCP: Consul's gRPC check speaks no client certificate, which every connection
      # here must present.
      check {
        type     = "tcp"
        port     = "grpc"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "jobworkerd" {
      driver = "docker"

      # SIGTERM, then this long before SIGKILL: jobworkerd closes its streams in
      # [server] shutdown_grace (5 s) and exits.
      kill_timeout = "30s"

      config {
        image = "jobworkerd:latest"
        ports = ["grpc"]
        args = [
          "--config", "/etc/jobworker/config.toml",
          "--listen", "0.0.0.0:50051",
          "--name", "${node.unique.name}",
          "--label", "node=${node.unique.name}",
          "--label", "datacenter=${node.datacenter}",
        ]

        # jobworkerd makes a cgroup, a PID, mount, UTS, IPC and network namespace, a
        # private /dev/pts and a seccomp filter for every job, mounts its root, and brings
        # up its loopback: CAP_SYS_ADMIN and CAP_NET_ADMIN, a writable cgroup filesystem
        # (delegation: the job cgroups go beneath the container's own, in its private
        # cgroup namespace), and no profile blocking unshare or mount. Docker grants the
        # writable cgroupfs to privileged containers only.
        # On a cgroup v2 node Docker gives the container a private cgroup namespace by
        # default, which is what jobworkerd wants (its job cgroups beneath its own).
        privileged = true

        volumes = [
          # The node's disk, not the container's: jobs' records and output outlive the
          # container, and the next one on the node finds them (jobs that were running
          # when it went are reported as lost: their processes ended with it).
          "/var/lib/jobworker:/var/lib/jobworker",
          "/etc/jobworker/tls:/etc/jobworker/tls:ro",
          "local/config.toml:/etc/jobworker/config.toml:ro",
        ]
      }

      template {
        destination = "local/config.toml"
        data        = <<-EOT
          [server]
          labels = { platform = "nomad" }
          [tls]
          ca = "/etc/jobworker/tls/ca.pem"
          cert = "/etc/jobworker/tls/server.pem"
          key = "/etc/jobworker/tls/server.key"
        EOT
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
