// leo_rt_runner: encode a source image and render frames from motion codes with AOTInductor packages, without
// Python. Inputs and outputs are leo_rt raw tensor files (export/rawtensor.py): "LEOT", u32 version 1,
// u32 dtype 0 (float32), u32 ndim, i64 dims[ndim], little-endian float32 data.
//
//   leo_rt_runner --source-encoder source_encoder.pt2 --renderer renderer.pt2
//                 --image image.leot --codes codes.leot --out frames.leot [--batch 8]
//
// image: (1, 3, S, S) in [-1, 1]; codes: (N, 20) motion codes (absolute mode); frames: (N, 3, S, S).
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
  std::map<std::string, std::string> args{{"--batch", "8"}};
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  for (const char* need : {"--source-encoder", "--renderer", "--image", "--codes", "--out"})
    if (!args.count(need)) throw std::runtime_error(std::string("missing ") + need);
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    auto args = parse(argc, argv);
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader source_encoder(args["--source-encoder"]);
    torch::inductor::AOTIModelPackageLoader renderer(args["--renderer"]);
    at::Tensor image = read_raw(args["--image"]);
    at::Tensor codes = read_raw(args["--codes"]);
    // source state once: w_a, alpha_src, styles0, feat_8 … feat_S
    std::vector<at::Tensor> state = source_encoder.run({image});
    const int64_t batch = std::max<int64_t>(1, std::stoll(args["--batch"]));
    std::vector<at::Tensor> frames;
    for (int64_t i = 0; i < codes.size(0); i += batch) {
      std::vector<at::Tensor> inputs{codes.slice(0, i, std::min(i + batch, codes.size(0))).contiguous()};
      inputs.insert(inputs.end(), state.begin() + 2, state.end());  // styles0 and the features, batch 1
      frames.push_back(renderer.run(inputs)[0]);
    }
    write_raw(args["--out"], torch::cat(frames));
    std::cout << "leo_rt_runner: " << codes.size(0) << " frames -> " << args["--out"] << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "leo_rt_runner: error: " << e.what() << std::endl;
    return 1;
  }
}
