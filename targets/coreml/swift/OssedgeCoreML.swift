// Reference driver for an ossedge Core ML artifact (`ossedge convert --target coreml`).
// Copy it into an iOS 18+ / macOS 15+ app (iOS 26 / macOS 26 for `--deployment-target ios26`).
//
// Call order per token (manifest.json "call_order"):
//   x = embedding row of the token (fp32)
//   for l in layers: (h, m, ids, w) = attn_l(x, pos)   // state: that function's k/v caches
//                    x = h + sum_j w[j] * expert_l_{ids[j]}(m)
//   logits = head(x)
//
// Usage:
//   let model = try await OssedgeCoreML(artifact: url)
//   var session = try model.newSession()
//   var logits = [Float]()
//   for token in promptIds { logits = try model.step(token: token, session: &session) }

import CoreML
import Foundation

public enum OssedgeError: Error {
    case manifest(String)
    case embedding(String)
    case contextFull(Int)
}

public final class OssedgeCoreML {
    public let layers: Int
    public let expertsPerToken: Int
    public let hiddenSize: Int
    public let vocabSize: Int
    public let maxContext: Int

    private var functions: [String: MLModel] = [:]
    private let embedding: Embedding

    public struct Session {
        public fileprivate(set) var position = 0
        fileprivate var states: [MLState]
    }

    /// Compiles (once per install; cache the .mlmodelc in Application Support in a real app) and
    /// loads every function of every package named in manifest.json.
    public init(artifact: URL, computeUnits: MLComputeUnits = .cpuAndNeuralEngine) async throws {
        let data = try Data(contentsOf: artifact.appendingPathComponent("manifest.json"))
        guard let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              manifest["format"] as? String == "ossedge-coreml",
              let config = manifest["config"] as? [String: Any],
              let functionTable = manifest["functions"] as? [String: [String: Any]],
              let embeddingInfo = manifest["embedding"] as? [String: Any]
        else { throw OssedgeError.manifest("not an ossedge Core ML artifact") }
        guard manifest["contract_version"] as? Int == 1 else {
            throw OssedgeError.manifest("unsupported artifact contract version")
        }
        layers = config["num_hidden_layers"] as? Int ?? 0
        expertsPerToken = config["num_experts_per_tok"] as? Int ?? 0
        hiddenSize = config["hidden_size"] as? Int ?? 0
        vocabSize = config["vocab_size"] as? Int ?? 0
        maxContext = manifest["max_context"] as? Int ?? 0

        var compiled: [String: URL] = [:]
        for (name, info) in functionTable {
            guard let package = info["package"] as? String else {
                throw OssedgeError.manifest("function \(name) names no package")
            }
            if compiled[package] == nil {
                compiled[package] = try await MLModel.compileModel(
                    at: artifact.appendingPathComponent(package))
            }
            let configuration = MLModelConfiguration()
            configuration.computeUnits = computeUnits
            configuration.functionName = name
            functions[name] = try MLModel(contentsOf: compiled[package]!,
                                          configuration: configuration)
        }
        embedding = try Embedding(
            url: artifact.appendingPathComponent(embeddingInfo["file"] as? String ?? ""),
            format: embeddingInfo["format"] as? String ?? "",
            hidden: hiddenSize)
    }

    /// A new conversation: fresh (zeroed) KV-cache states for every attention function.
    public func newSession() throws -> Session {
        Session(states: (0..<layers).map { functions["attn_\($0)"]!.makeState() })
    }

    /// Feeds one token at the session's position; returns the next-token logits.
    public func step(token: Int, session: inout Session) throws -> [Float] {
        guard session.position < maxContext else { throw OssedgeError.contextFull(maxContext) }
        var x = try embedding.row(token)
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: session.position)
        for l in 0..<layers {
            let input = try MLDictionaryFeatureProvider(dictionary: [
                "x": MLFeatureValue(multiArray: try floats(x, shape: [1, hiddenSize])),
                "pos": MLFeatureValue(multiArray: pos),
            ])
            let out = try functions["attn_\(l)"]!.prediction(from: input,
                                                              using: session.states[l])
            var h = read(out.featureValue(for: "h")!.multiArrayValue!)
            let m = out.featureValue(for: "m")!.multiArrayValue!
            let ids = out.featureValue(for: "ids")!.multiArrayValue!
            let w = read(out.featureValue(for: "w")!.multiArrayValue!)
            let expertInput = try MLDictionaryFeatureProvider(dictionary: [
                "m": MLFeatureValue(multiArray: m),
            ])
            for j in 0..<expertsPerToken {
                let e = ids[j].intValue
                let y = try functions["expert_\(l)_\(e)"]!.prediction(from: expertInput)
                let values = read(y.featureValue(for: "y")!.multiArrayValue!)
                for i in 0..<hiddenSize { h[i] += w[j] * values[i] }
            }
            x = h
        }
        let headInput = try MLDictionaryFeatureProvider(dictionary: [
            "h": MLFeatureValue(multiArray: try floats(x, shape: [1, hiddenSize])),
        ])
        let logits = try functions["head"]!.prediction(from: headInput)
        session.position += 1
        return read(logits.featureValue(for: "logits")!.multiArrayValue!)
    }

    private func floats(_ values: [Float], shape: [Int]) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
        a.withUnsafeMutableBufferPointer(ofType: Float.self) { p, _ in
            for i in 0..<values.count { p[i] = values[i] }
        }
        return a
    }

    private func read(_ a: MLMultiArray) -> [Float] {
        (0..<a.count).map { a[$0].floatValue }  // handles fp16 and fp32 arrays
    }
}

/// The embedding table in `embedding.safetensors`, memory-mapped: int8 rows with one fp32 scale
/// each (`int8-ch`), or fp16 rows.
struct Embedding {
    let data: Data
    let format: String
    let hidden: Int
    var offsets: [String: Int] = [:]

    init(url: URL, format: String, hidden: Int) throws {
        data = try Data(contentsOf: url, options: .alwaysMapped)
        self.format = format
        self.hidden = hidden
        let headerSize = data.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self)) }
        guard let header = try JSONSerialization.jsonObject(
            with: data.subdata(in: 8..<(8 + headerSize))) as? [String: Any]
        else { throw OssedgeError.embedding("unreadable safetensors header") }
        for (name, info) in header {
            if let offsets = (info as? [String: Any])?["data_offsets"] as? [Int] {
                self.offsets[name] = 8 + headerSize + offsets[0]
            }
        }
    }

    func row(_ token: Int) throws -> [Float] {
        switch format {
        case "int8-ch":
            guard let q = offsets["embedding.q"], let s = offsets["embedding.scale"] else {
                throw OssedgeError.embedding("int8 embedding parts missing")
            }
            return data.withUnsafeBytes { raw in
                let scale = raw.loadUnaligned(fromByteOffset: s + 4 * token, as: Float.self)
                return (0..<hidden).map { i in
                    Float(raw.load(fromByteOffset: q + token * hidden + i, as: Int8.self)) * scale
                }
            }
        case "fp16":
            guard let e = offsets["embedding"] else {
                throw OssedgeError.embedding("fp16 embedding missing")
            }
            return data.withUnsafeBytes { raw in
                (0..<hidden).map { i in
                    Float(raw.loadUnaligned(fromByteOffset: e + 2 * (token * hidden + i),
                                            as: Float16.self))
                }
            }
        default:
            throw OssedgeError.embedding("embedding format \(format) is not supported here")
        }
    }
}
