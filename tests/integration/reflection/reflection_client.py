#!/usr/bin/python3
"""A gRPC client that knows blockplane's API only through server reflection.

This is what grpcurl does and what operators rely on: no .proto files, no generated code. The only
schema built in is the reflection protocol itself (grpc.reflection.v1alpha), because Debian ships
python3-grpcio without the grpc_reflection module; it is declared below as a FileDescriptorProto,
the same form in which the server sends every other schema.

The client
  1. lists the services and checks that DeviceService, Health and the reflection service are there;
  2. fetches the file descriptors that define blockplane.v1.DeviceService (with their dependencies)
     and builds the request and response classes at run time;
  3. calls grpc.health.v1.Health/Check (also built from reflection) and expects SERVING;
  4. with --attach-path, attaches devices through AttachDevice and checks that ListDevices (one
     page at a time, following next_page_token) and GetDevice return them, then detaches them;
  5. otherwise calls ListDevices and prints the devices.

Run with Debian's interpreter (python3-grpcio, python3-protobuf):
  /usr/bin/python3 reflection_client.py --socket /run/blockplane/blockplane.sock
Exit status 0 when every check passed, 1 otherwise (with the reason on stderr).
"""

import argparse
import sys

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import json_format
from google.protobuf import message_factory

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_METHOD = "/%s/ServerReflectionInfo" % REFLECTION_SERVICE
DEVICE_SERVICE = "blockplane.v1.DeviceService"
HEALTH_SERVICE = "grpc.health.v1.Health"


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def message_class(pool, full_name):
    """The Python class of message `full_name` from `pool`, across protobuf versions."""
    descriptor = pool.FindMessageTypeByName(full_name)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def reflection_file_descriptor():
    """grpc/reflection/v1alpha/reflection.proto, written out as a FileDescriptorProto."""
    f = descriptor_pb2.FileDescriptorProto()
    f.name = "grpc/reflection/v1alpha/reflection.proto"
    f.package = "grpc.reflection.v1alpha"
    f.syntax = "proto3"
    T = descriptor_pb2.FieldDescriptorProto

    def message(name, fields):
        m = f.message_type.add()
        m.name = name
        for number, field_name, field_type, type_name, label, oneof in fields:
            field = m.field.add()
            field.name = field_name
            field.number = number
            field.type = field_type
            field.label = label
            field.json_name = json_name(field_name)
            if type_name:
                field.type_name = ".grpc.reflection.v1alpha." + type_name
            if oneof is not None:
                field.oneof_index = oneof
        return m

    optional, repeated = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    request = message("ServerReflectionRequest", [
        (1, "host", T.TYPE_STRING, None, optional, None),
        (3, "file_by_filename", T.TYPE_STRING, None, optional, 0),
        (4, "file_containing_symbol", T.TYPE_STRING, None, optional, 0),
        (5, "file_containing_extension", T.TYPE_MESSAGE, "ExtensionRequest", optional, 0),
        (6, "all_extension_numbers_of_type", T.TYPE_STRING, None, optional, 0),
        (7, "list_services", T.TYPE_STRING, None, optional, 0),
    ])
    request.oneof_decl.add().name = "message_request"
    message("ExtensionRequest", [
        (1, "containing_type", T.TYPE_STRING, None, optional, None),
        (2, "extension_number", T.TYPE_INT32, None, optional, None),
    ])
    response = message("ServerReflectionResponse", [
        (1, "valid_host", T.TYPE_STRING, None, optional, None),
        (2, "original_request", T.TYPE_MESSAGE, "ServerReflectionRequest", optional, None),
        (4, "file_descriptor_response", T.TYPE_MESSAGE, "FileDescriptorResponse", optional, 0),
        (5, "all_extension_numbers_response", T.TYPE_MESSAGE, "ExtensionNumberResponse",
         optional, 0),
        (6, "list_services_response", T.TYPE_MESSAGE, "ListServiceResponse", optional, 0),
        (7, "error_response", T.TYPE_MESSAGE, "ErrorResponse", optional, 0),
    ])
    response.oneof_decl.add().name = "message_response"
    message("FileDescriptorResponse", [
        (1, "file_descriptor_proto", T.TYPE_BYTES, None, repeated, None),
    ])
    message("ExtensionNumberResponse", [
        (1, "base_type_name", T.TYPE_STRING, None, optional, None),
        (2, "extension_number", T.TYPE_INT32, None, repeated, None),
    ])
    message("ListServiceResponse", [
        (1, "service", T.TYPE_MESSAGE, "ServiceResponse", repeated, None),
    ])
    message("ServiceResponse", [
        (1, "name", T.TYPE_STRING, None, optional, None),
    ])
    message("ErrorResponse", [
        (1, "error_code", T.TYPE_INT32, None, optional, None),
        (2, "error_message", T.TYPE_STRING, None, optional, None),
    ])
    service = f.service.add()
    service.name = "ServerReflection"
    method = service.method.add()
    method.name = "ServerReflectionInfo"
    method.input_type = ".grpc.reflection.v1alpha.ServerReflectionRequest"
    method.output_type = ".grpc.reflection.v1alpha.ServerReflectionResponse"
    method.client_streaming = True
    method.server_streaming = True
    return f


def health_file_descriptor():
    """grpc/health/v1/health.proto (Check only). gRPC C++'s built-in health service is not backed
    by a registered descriptor, so its reflection lists the service but cannot describe it; this is
    the well-known definition to fall back on."""
    f = descriptor_pb2.FileDescriptorProto()
    f.name = "grpc/health/v1/health.proto"
    f.package = "grpc.health.v1"
    f.syntax = "proto3"
    T = descriptor_pb2.FieldDescriptorProto
    request = f.message_type.add()
    request.name = "HealthCheckRequest"
    field = request.field.add()
    field.name, field.json_name, field.number = "service", "service", 1
    field.type, field.label = T.TYPE_STRING, T.LABEL_OPTIONAL
    response = f.message_type.add()
    response.name = "HealthCheckResponse"
    status = response.enum_type.add()
    status.name = "ServingStatus"
    for number, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        value = status.value.add()
        value.name, value.number = name, number
    field = response.field.add()
    field.name, field.json_name, field.number = "status", "status", 1
    field.type, field.label = T.TYPE_ENUM, T.LABEL_OPTIONAL
    field.type_name = ".grpc.health.v1.HealthCheckResponse.ServingStatus"
    service = f.service.add()
    service.name = "Health"
    method = service.method.add()
    method.name = "Check"
    method.input_type = ".grpc.health.v1.HealthCheckRequest"
    method.output_type = ".grpc.health.v1.HealthCheckResponse"
    return f


def json_name(name):
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


class ReflectionClient:
    """Asks a server's reflection service for its services and schemas."""

    def __init__(self, channel, timeout):
        self._timeout = timeout
        pool = descriptor_pool.DescriptorPool()
        pool.Add(reflection_file_descriptor())
        self._request_class = message_class(pool, "grpc.reflection.v1alpha.ServerReflectionRequest")
        response_class = message_class(pool, "grpc.reflection.v1alpha.ServerReflectionResponse")
        self._call = channel.stream_stream(
            REFLECTION_METHOD,
            request_serializer=self._request_class.SerializeToString,
            response_deserializer=response_class.FromString)

    def _ask(self, **fields):
        """One request on its own stream; returns the single response."""
        request = self._request_class(**fields)
        responses = list(self._call(iter([request]), timeout=self._timeout))
        check(len(responses) == 1, "reflection: expected 1 response to %s, got %d" %
              (fields, len(responses)))
        response = responses[0]
        if response.WhichOneof("message_response") == "error_response":
            raise CheckFailed("reflection: %s -> error %d: %s" % (
                fields, response.error_response.error_code,
                response.error_response.error_message))
        return response

    def list_services(self):
        response = self._ask(list_services="*")
        return [service.name for service in response.list_services_response.service]

    def _files(self, **fields):
        response = self._ask(**fields)
        check(response.WhichOneof("message_response") == "file_descriptor_response",
              "reflection: %s answered without file descriptors" % fields)
        files = []
        for serialized in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto()
            proto.ParseFromString(serialized)
            files.append(proto)
        return files

    def pool_for_symbol(self, symbol):
        """A new DescriptorPool holding the file that defines `symbol` and every file it imports,
        all fetched from the server."""
        known = {}
        for proto in self._files(file_containing_symbol=symbol):
            known[proto.name] = proto
        # The server usually sends the transitive imports along; ask for any that are missing.
        missing = [d for p in list(known.values()) for d in p.dependency if d not in known]
        while missing:
            name = missing.pop()
            if name in known:
                continue
            for proto in self._files(file_by_filename=name):
                known.setdefault(proto.name, proto)
                missing.extend(d for d in proto.dependency if d not in known)
        pool = descriptor_pool.DescriptorPool()
        added = set()

        def add(name):  # dependencies first
            if name in added:
                return
            for dependency in known[name].dependency:
                add(dependency)
            pool.Add(known[name])
            added.add(name)

        for name in sorted(known):
            add(name)
        return pool, sorted(known)


class DynamicService:
    """Unary calls of one service, with message classes built from a reflected pool."""

    def __init__(self, channel, pool, service_name, timeout):
        self._channel = channel
        self._pool = pool
        self._timeout = timeout
        self.descriptor = pool.FindServiceByName(service_name)

    def method_names(self):
        return [method.name for method in self.descriptor.methods]

    def message(self, method_name, **fields):
        """A new request message for `method_name`, built from the reflected input type."""
        method = self.descriptor.FindMethodByName(method_name)
        check(method is not None, "%s has no method %s" % (self.descriptor.full_name, method_name))
        return message_class(self._pool, method.input_type.full_name)(**fields)

    def call(self, method_name, request):
        method = self.descriptor.FindMethodByName(method_name)
        response_class = message_class(self._pool, method.output_type.full_name)
        stub = self._channel.unary_unary(
            "/%s/%s" % (self.descriptor.full_name, method_name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_class.FromString)
        return stub(request, timeout=self._timeout)


def list_all_devices(devices, page_size):
    """ListDevices, following next_page_token; returns the devices of every page."""
    result = []
    token = ""
    for _ in range(10000):
        response = devices.call("ListDevices",
                                devices.message("ListDevices", page_size=page_size,
                                                page_token=token))
        result.extend(response.devices)
        token = response.next_page_token
        if not token:
            return result
    raise CheckFailed("ListDevices never returned an empty next_page_token")


def run(args):
    channel = grpc.insecure_channel("unix:" + args.socket)
    grpc.channel_ready_future(channel).result(timeout=args.timeout)
    reflection = ReflectionClient(channel, args.timeout)

    services = reflection.list_services()
    print("services: %s" % ", ".join(services))
    for wanted in (DEVICE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE):
        check(wanted in services, "service %s is not listed (got %s)" % (wanted, services))

    pool, files = reflection.pool_for_symbol(DEVICE_SERVICE)
    print("descriptor files for %s: %s" % (DEVICE_SERVICE, ", ".join(files)))
    check("blockplane/v1/device.proto" in files, "device.proto not among %s" % files)
    devices = DynamicService(channel, pool, DEVICE_SERVICE, args.timeout)
    methods = devices.method_names()
    for wanted in ("AttachDevice", "DrainDevice", "ResumeDevice", "DetachDevice", "ResizeDevice",
                   "GetDevice", "ListDevices", "WatchDevices", "GetDeviceStats"):
        check(wanted in methods, "%s has no method %s (got %s)" % (DEVICE_SERVICE, wanted, methods))

    try:
        health_pool, _ = reflection.pool_for_symbol(HEALTH_SERVICE)
    except CheckFailed as error:
        # Listed but not describable: see health_file_descriptor().
        print("note: %s; using the well-known grpc.health.v1 definition" % error)
        health_pool = descriptor_pool.DescriptorPool()
        health_pool.Add(health_file_descriptor())
    health = DynamicService(channel, health_pool, HEALTH_SERVICE, args.timeout)
    reply = health.call("Check", health.message("Check", service=""))
    serving = reply.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_name["SERVING"].number
    check(reply.status == serving, "health: status %d, expected SERVING" % reply.status)
    print("health: SERVING")

    # An error comes back as a gRPC status naming the field, also for a reflection-built request.
    try:
        devices.call("GetDevice", devices.message("GetDevice", device_id="no-such-device"))
        raise CheckFailed("GetDevice of an unknown id succeeded")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.NOT_FOUND,
              "GetDevice of an unknown id: %s, expected NOT_FOUND" % error.code())
        check(error.details().startswith("device_id: "),
              "GetDevice error does not name the field: %r" % error.details())

    before = list_all_devices(devices, args.page_size)
    print("devices before: %s" % [d.id for d in before])

    if args.attach_path:
        # One device per backing file, ids reflection0, reflection1, ...; with --page-size 1,
        # listing them takes one page each.
        attached_ids = []
        for index, path in enumerate(args.attach_path):
            device_id = "%s%d" % (args.device_id_prefix, index)
            check(device_id not in [d.id for d in before], "%s exists before the test" % device_id)
            request = devices.message("AttachDevice")
            json_format.ParseDict({
                "deviceId": device_id,
                "spec": {
                    "backend": {"path": path, "cache": "CACHE_MODE_WRITEBACK"},
                    "vhostUser": {"socketPath": "%s/%s.sock" % (args.vhost_socket_dir, device_id)},
                },
            }, request)
            attached = devices.call("AttachDevice", request)
            print("attached: %s" % json_format.MessageToJson(attached, indent=None))
            check(attached.id == device_id, "AttachDevice returned %r" % attached.id)
            attached_ids.append(device_id)

        after = list_all_devices(devices, args.page_size)
        ids = [d.id for d in after]
        print("devices after attach: %s" % ids)
        check(ids == sorted(ids), "ListDevices is not sorted by id: %s" % ids)
        check(sorted(ids) == sorted([d.id for d in before] + attached_ids),
              "listed %s, expected %s plus %s" % (ids, [d.id for d in before], attached_ids))
        for index, device_id in enumerate(attached_ids):
            listed = next(d for d in after if d.id == device_id)
            check(listed.spec.backend.path == args.attach_path[index],
                  "%s: listed path %r, attached %r" % (device_id, listed.spec.backend.path,
                                                        args.attach_path[index]))
            check(listed.spec.vhost_user.socket_path.endswith("/%s.sock" % device_id),
                  "%s: listed vhost socket %r" % (device_id, listed.spec.vhost_user.socket_path))
            if args.expect_size:
                check(listed.status.size_bytes == args.expect_size,
                      "%s: listed size %d, expected %d" % (device_id, listed.status.size_bytes,
                                                           args.expect_size))
            state = listed.status.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[
                listed.status.state].name
            check(state not in ("DEVICE_STATE_UNSPECIFIED", "DEVICE_STATE_FAILED"),
                  "%s is %s" % (device_id, state))
            fetched = devices.call("GetDevice", devices.message("GetDevice", device_id=device_id))
            check(fetched.spec == listed.spec,
                  "%s: GetDevice and ListDevices disagree on the spec" % device_id)

        for device_id in attached_ids:
            devices.call("DetachDevice", devices.message("DetachDevice", device_id=device_id,
                                                         force=True))
        final = [d.id for d in list_all_devices(devices, args.page_size)]
        print("devices after detach: %s" % final)
        check(final == [d.id for d in before], "after DetachDevice: %s" % final)
    else:
        for device in before:
            print(json_format.MessageToJson(device, indent=None))
    print("OK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="blockplaned's unix socket")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--page-size", type=int, default=1,
                        help="ListDevices page size (small, to exercise paging)")
    parser.add_argument("--attach-path", action="append",
                        help="backing file to attach a device with (repeatable)")
    parser.add_argument("--vhost-socket-dir",
                        help="folder for the vhost-user sockets of the attached devices")
    parser.add_argument("--device-id-prefix", default="reflection")
    parser.add_argument("--expect-size", type=int, default=0,
                        help="size in bytes the attached device must report")
    args = parser.parse_args()
    if args.attach_path and not args.vhost_socket_dir:
        parser.error("--attach-path needs --vhost-socket-dir")
    try:
        run(args)
    except (CheckFailed, grpc.RpcError, grpc.FutureTimeoutError) as error:
        if isinstance(error, grpc.RpcError):
            error = "%s: %s" % (error.code().name, error.details())
        elif isinstance(error, grpc.FutureTimeoutError):
            error = "cannot connect to unix:%s" % args.socket
        print("reflection_client: FAILED: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
