//! gRPC server reflection: `grpcurl` and similar tools list and call the
//! API without the `.proto` files, with a client token like the API itself.

use prost::Message;
use tonic::{Code, Status};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use weft_client::BearerToken;
use weft_tests::TestCluster;

/// One reflection request over a fresh stream, sending `token`.
async fn ask(
    cluster: &TestCluster,
    token: Option<&str>,
    request: MessageRequest,
) -> Result<MessageResponse, Status> {
    let channel = weft_tests::fake_node::channel(&cluster.url()).await;
    let bearer = BearerToken::new(token).expect("a well-formed token");
    let mut client = ServerReflectionClient::with_interceptor(channel, bearer);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client.server_reflection_info(requests).await?.into_inner();
    let answer = answers.message().await?.expect("one answer per request");
    Ok(answer
        .message_response
        .expect("an answer carries a response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_api_to_a_client_with_a_token() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let token = cluster.scoped_token(&["read"]).await;

    let listed = ask(
        &cluster,
        Some(&token),
        MessageRequest::ListServices(String::new()),
    )
    .await
    .unwrap();
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("not a list of services: {listed:?}");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "weft.v1.TaskService",
        "weft.v1.AdminService",
        "weft.v1.NodeService",
    ] {
        assert!(services.contains(&service), "{service} in {services:?}");
    }

    // A tool describes a service from the file that holds it, then asks
    // for each file that one imports, by name, and so on: with these it
    // builds requests without any .proto file.
    let task_file = file(
        &cluster,
        &token,
        MessageRequest::FileContainingSymbol("weft.v1.TaskService".into()),
    )
    .await;
    assert_eq!(task_file.name(), "weft/v1/task.proto");
    let methods: Vec<&str> = task_file
        .service
        .iter()
        .find(|s| s.name() == "TaskService")
        .expect("TaskService described")
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    for method in ["Submit", "Get", "Watch", "WaitMany", "WaitManyBatches"] {
        assert!(methods.contains(&method), "{method} in {methods:?}");
    }
    let mut todo = task_file.dependency.clone();
    let mut fetched = Vec::new();
    while let Some(name) = todo.pop() {
        if fetched.contains(&name) {
            continue;
        }
        let dependency = file(
            &cluster,
            &token,
            MessageRequest::FileByFilename(name.clone()),
        )
        .await;
        assert_eq!(dependency.name(), name);
        todo.extend(dependency.dependency.iter().cloned());
        fetched.push(name);
    }
    for name in ["weft/v1/common.proto", "google/protobuf/timestamp.proto"] {
        assert!(fetched.iter().any(|f| f == name), "{name} in {fetched:?}");
    }
}

/// The one file descriptor a reflection request answers.
async fn file(
    cluster: &TestCluster,
    token: &str,
    request: MessageRequest,
) -> prost_types::FileDescriptorProto {
    let answer = ask(cluster, Some(token), request).await.unwrap();
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        panic!("not file descriptors: {answer:?}");
    };
    let [bytes] = files.file_descriptor_proto.as_slice() else {
        panic!(
            "one file per answer, not {}",
            files.file_descriptor_proto.len()
        );
    };
    prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_without_a_valid_token_is_unauthenticated() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    for token in [
        None,
        Some("weft_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ] {
        let refused = ask(&cluster, token, MessageRequest::ListServices(String::new()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
}
