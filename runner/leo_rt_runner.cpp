// leo_rt_runner: encode a source image and render frames from motion codes with AOTInductor packages, without
// Python. Inputs and outputs are leo_rt raw tensor files (export/rawtensor.py): "LEOT", u32 version 1,
// u32 dtype 0 (float32), u32 ndim, i64 dims[ndim], little-endian float32 data.
//
//   leo_rt_runner --source-encoder source_encoder.pt2 --renderer renderer.pt2
//                 --image image.leot --codes codes.leot --out frames.leot [--batch 8] [--dtype fp32|fp16|bf16]
//
// image: (1, 3, S, S) in [-1, 1]; codes: (N, 20) motion codes (absolute mode); frames: (N, 3, S, S).
// The packages' device (CPU or CUDA) is read from their metadata: inputs are moved there, frames come back to the
// host. --dtype is the precision the packages were exported in (`leo-rt export --precision`): the image and codes
// are cast to it (the styles stay float32, as every stage keeps them); frames are written as float32.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

at::Tensor read_raw(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[4];
  uint32_t version = 0, dtype = 0, ndim = 0;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&version), 4);
  f.read(reinterpret_cast<char*>(&dtype), 4);
  f.read(reinterpret_cast<char*>(&ndim), 4);
  if (!f || std::memcmp(magic, "LEOT", 4) != 0 || version != 1 || dtype != 0 || ndim > 8)
    throw std::runtime_error(path + " is not a leo_rt raw float32 tensor file");
  std::vector<int64_t> shape(ndim);
  f.read(reinterpret_cast<char*>(shape.data()), static_cast<std::streamsize>(8 * ndim));
  at::Tensor t = torch::empty(shape, torch::kFloat32);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.numel() * 4));
  if (!f) throw std::runtime_error(path + " is truncated");
  return t;
}

void write_raw(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.to(torch::kFloat32).contiguous();
  const std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp, std::ios::binary);
    uint32_t head[3] = {1, 0, static_cast<uint32_t>(t.dim())};
    f.write("LEOT", 4);
    f.write(reinterpret_cast<const char*>(head), sizeof(head));
    for (int64_t s : t.sizes()) f.write(reinterpret_cast<const char*>(&s), 8);
    f.write(reinterpret_cast<const char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.numel() * 4));
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename onto " + path);
}

std::map<std::string, std::string> parse(int argc, char** argv) {
  std::map<std::string, std::string> args{{"--batch", "8"}, {"--dtype", "fp32"}};
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  for (const char* need : {"--source-encoder", "--renderer", "--image", "--codes", "--out"})
    if (!args.count(need)) throw std::runtime_error(std::string("missing ") + need);
  return args;
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "fp16") return torch::kFloat16;
  if (name == "bf16") return torch::kBFloat16;
  throw std::runtime_error("--dtype must be fp32, fp16 or bf16, got " + name);
}

// The device a package was compiled for, from the metadata AOTInductor writes into it.
c10::Device package_device(torch::inductor::AOTIModelPackageLoader& loader, const std::string& path) {
  auto meta = loader.get_metadata();
  auto it = meta.find("AOTI_DEVICE_KEY");
  const std::string device = it == meta.end() ? "cpu" : it->second;
  if (device == "cpu") return c10::Device(c10::kCPU);
  if (device == "cuda") {
    if (!torch::cuda::is_available())
      throw std::runtime_error(path + " is a CUDA package but no CUDA device is visible");
    return c10::Device(c10::kCUDA, 0);
  }
  throw std::runtime_error(path + " was compiled for device '" + device + "', which this runner does not handle");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    auto args = parse(argc, argv);
    torch::NoGradGuard no_grad;
    const c10::ScalarType dtype = parse_dtype(args["--dtype"]);
    torch::inductor::AOTIModelPackageLoader source_encoder(args["--source-encoder"]);
    torch::inductor::AOTIModelPackageLoader renderer(args["--renderer"]);
    const c10::Device device = package_device(source_encoder, args["--source-encoder"]);
    if (package_device(renderer, args["--renderer"]) != device)
      throw std::runtime_error("the source encoder and the renderer were compiled for different devices");
    at::Tensor image = read_raw(args["--image"]).to(device, dtype).contiguous();
    at::Tensor codes = read_raw(args["--codes"]).to(device, dtype);
    // source state once: w_a, alpha_src, styles0, feat_8 … feat_S (on the packages' device)
    std::vector<at::Tensor> state = source_encoder.run({image});
    const int64_t batch = std::max<int64_t>(1, std::stoll(args["--batch"]));
    std::vector<at::Tensor> frames;
    for (int64_t i = 0; i < codes.size(0); i += batch) {
      std::vector<at::Tensor> inputs{codes.slice(0, i, std::min(i + batch, codes.size(0))).contiguous()};
      inputs.insert(inputs.end(), state.begin() + 2, state.end());  // styles0 and the features, batch 1
      frames.push_back(renderer.run(inputs)[0].to(torch::kCPU));
    }
    write_raw(args["--out"], torch::cat(frames));
    std::cout << "leo_rt_runner: " << codes.size(0) << " frames -> " << args["--out"] << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "leo_rt_runner: error: " << e.what() << std::endl;
    return 1;
  }
}
